"""Launchers (launch/, configs/accelerate/): exit-code contract, relaunch/requeue logic, signals.

Stand-ins replace accelerate, srun, scontrol, sleep and the training program, so these run on a
CPU in seconds. A few tests run the real `accelerate launch` (CPU, a stub training script) because
the exit-code and signal handling depend on what accelerate and torchrun really do.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SHELL_SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
TIMEOUT = 60  # seconds; every subprocess gets one so that a broken launcher fails, not hangs
PY = sys.executable

# Variables the launchers read: the tests set them explicitly, never inherit them.
_LEAKY = ("CONFIG", "OUTPUT_DIR", "CHECKPOINT_DIR", "RUN_NAME", "ACCELERATE_ARGS", "TRAIN_CMD",
          "TRAIN_SCRIPT", "NUM_GPUS", "NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP",
          "MAIN_PROCESS_PORT", "GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES", "TINYDIST_ROOT",
          "TINYDIST_EXIT_DIR", "MAX_ATTEMPTS", "BACKOFF_S", "MAX_BACKOFF_S", "PREEMPT_DELAY_S",
          "SLEEP", "SRUN", "SCONTROL", "ACCELERATE", "RANK")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in _LEAKY and not k.startswith(("SLURM_", "SKYPILOT_"))}
    # the venv's accelerate (tests run as .venv/bin/pytest) before anything else on PATH
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def script(path: Path, body: str) -> Path:
    """An executable Python stand-in."""
    path.write_text(f"#!{PY}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def wait_for(path: Path, proc: subprocess.Popen, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- stand-ins

FAKE_ACCELERATE = """
    # Stand-in for `accelerate`: records its arguments; exits like accelerate would.
    import json, os, sys
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID"),
                            "ckpt_env": os.environ.get("CHECKPOINT_DIR")}) + "\\n")
    codes = os.environ.get("FAKE_RANK_CODES")
    if codes:  # per-rank codes; accelerate itself turns any failure into 1
        for rank, code in enumerate(codes.split(",")):
            with open(os.path.join(os.environ["TINYDIST_EXIT_DIR"], f"rank{rank}.code"), "w") as f:
                f.write(code + "\\n")
        sys.exit(1 if any(c != "0" for c in codes.split(",")) else 0)
    sys.exit(int(os.environ.get("FAKE_RC", "0")))
"""

FAKE_SRUN = """
    # Stand-in for srun: runs the command once per node with SLURM_NODEID set; returns the
    # highest exit code, as srun does.
    import json, os, subprocess, sys
    args = sys.argv[1:]
    opts = []
    while args and args[0].startswith("-"):
        opts.append(args.pop(0))
    with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
        f.write(json.dumps(opts) + "\\n")
    rcs = [subprocess.run(args, env=dict(os.environ, SLURM_NODEID=str(n)), timeout=50).returncode
           for n in range(int(os.environ["SLURM_NNODES"]))]
    sys.exit(max(rcs))
"""

FAKE_SCONTROL = """
    # Stand-in for scontrol: `show hostnames LIST` and `requeue JOBID`.
    import os, sys
    if sys.argv[1:3] == ["show", "hostnames"]:
        print("node01\\nnode02")
    elif sys.argv[1] == "requeue":
        with open(os.environ["FAKE_SCONTROL_LOG"], "a") as f:
            f.write(" ".join(sys.argv[1:]) + "\\n")
        sys.exit(int(os.environ.get("FAKE_REQUEUE_RC", "0")))
    else:
        sys.exit(f"unexpected scontrol {sys.argv[1:]}")
"""

COUNTING_TRAINER = """
    # Stand-in training command: counts its launches; exits with CODES[launch] (last one repeats).
    import os, sys
    f = os.environ["COUNT_FILE"]
    n = int(open(f).read()) + 1 if os.path.exists(f) else 1
    open(f, "w").write(str(n))
    with open(f + ".args", "a") as a:
        a.write(repr((sys.argv[1:], os.environ.get("CHECKPOINT_DIR"))) + "\\n")
    codes = os.environ["CODES"].split(",")
    sys.exit(int(codes[min(n, len(codes)) - 1]))
"""

SIGNALLED_TRAINER = """
    # Stand-in training program: on TERM/INT/USR1 "saves" (a short sleep) and exits 75, the contract.
    import os, signal, sys, time
    got = []
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, lambda n, _: got.append(signal.Signals(n).name))
    out = os.environ["STUB_DIR"]
    rank = os.environ.get("RANK", "0")
    open(os.path.join(out, f"ready{rank}"), "w").close()
    deadline = time.monotonic() + 40
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    with open(os.path.join(out, f"got{rank}"), "w") as f:
        f.write(",".join(got))
    sys.exit(75 if got else 1)
"""

EXIT_TRAINER = """
    # Stand-in training program: exits with RANK_CODES[rank] (or CODE).
    import os, sys
    codes = os.environ.get("RANK_CODES", "").split(",")
    rank = int(os.environ.get("RANK", "0"))
    sys.exit(int(codes[rank]) if codes[0] else int(os.environ["CODE"]))
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return {
        "accelerate": script(bin_dir / "accelerate", FAKE_ACCELERATE),
        "srun": script(bin_dir / "srun", FAKE_SRUN),
        "scontrol": script(bin_dir / "scontrol", FAKE_SCONTROL),
        "log": tmp_path / "accelerate.log",
        "srun_log": tmp_path / "srun.log",
        "scontrol_log": tmp_path / "scontrol.log",
    }


def accelerate_calls(fakes):
    return [json.loads(line) for line in fakes["log"].read_text().splitlines()]


def flag(argv, name):
    return argv[argv.index(name) + 1]


def train_args(argv):
    return argv[argv.index("launch/exit_status.py") + 2:]


# --------------------------------------------------------------------------- static checks

@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(path):
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=TIMEOUT)


def _skypilot_blocks(tmp_path):
    task = yaml.safe_load((LAUNCH / "skypilot.yaml").read_text())
    paths = []
    for key in ("setup", "run"):
        p = tmp_path / f"skypilot_{key}.sh"
        p.write_text("#!/usr/bin/env bash\n" + task[key])
        paths.append(p)
    return paths


def test_skypilot_blocks_bash_syntax(tmp_path):
    for p in _skypilot_blocks(tmp_path):
        subprocess.run(["bash", "-n", str(p)], check=True, timeout=TIMEOUT)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
def test_shellcheck(tmp_path):
    paths = [str(p) for p in SHELL_SCRIPTS] + [str(p) for p in _skypilot_blocks(tmp_path)]
    r = subprocess.run(["shellcheck", "-x", *paths], cwd=ROOT, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_executable():
    for p in LAUNCH.glob("*.sh"):
        if p.name != "common.sh":  # sourced, not run
            assert os.access(p, os.X_OK), p


@pytest.mark.parametrize("name,dist,procs,machines", [
    ("one_gpu", "NO", 1, 1), ("one_node", "MULTI_GPU", 8, 1), ("multi_node", "MULTI_GPU", 16, 2)])
def test_accelerate_configs(name, dist, procs, machines):
    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["compute_environment"] == "LOCAL_MACHINE"
    assert cfg["distributed_type"] == dist
    assert cfg["num_processes"] == procs and cfg["num_machines"] == machines
    assert cfg["mixed_precision"] == "bf16"
    assert cfg["gpu_ids"] == "all"  # never override CUDA_VISIBLE_DEVICES chosen by SLURM
    if name == "multi_node":
        text = path.read_text()
        assert "--machine_rank" in text and "--main_process_ip" in text  # documented as CLI
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    loaded = config_args.load_config_from_file(str(path))
    assert loaded.num_processes == procs


def test_sbatch_directives():
    lines = (LAUNCH / "slurm.sbatch").read_text().splitlines()
    first_command = next(i for i, l in enumerate(lines[1:], 1) if l.strip() and not l.startswith("#"))
    directives = [l.split(None, 1)[1] for l in lines[:first_command] if l.startswith("#SBATCH")]
    assert not any(l.startswith("#SBATCH") for l in lines[first_command:]), "sbatch ignores these"
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert "--ntasks-per-node=1" in directives
    sig = next(d for d in directives if d.startswith("--signal="))
    assert sig.startswith("--signal=USR1@"), "signal the job steps (not B:): see the comment"


def test_skypilot_yaml_keys():
    task = yaml.safe_load((LAUNCH / "skypilot.yaml").read_text())
    res = task["resources"]
    assert res["use_spot"] is True
    assert len(res["accelerators"]) >= 2 and all(v == 8 for v in res["accelerators"].values())
    rec = res["job_recovery"]
    assert rec["strategy"] == "FAILOVER" and rec["max_restarts_on_errors"] >= 1
    assert 75 in rec["recover_on_exit_codes"]
    assert task["envs"]["CHECKPOINT_DIR"].startswith("s3://")
    assert 'pip install -e ".[s3]"' in task["setup"]
    for var in ("SKYPILOT_NUM_GPUS_PER_NODE", "SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS",
                "SKYPILOT_NUM_NODES"):
        assert var in task["run"]
    assert isinstance(task["num_nodes"], int) and task["workdir"] == "."


def test_skypilot_yaml_loads_with_skypilot():
    sky = pytest.importorskip("sky", reason="skypilot is not installed (optional)")
    task = sky.Task.from_yaml(str(LAUNCH / "skypilot.yaml"))
    assert all(r.use_spot for r in task.resources)


# --------------------------------------------------------------------------- one_gpu / one_node

def test_one_gpu_args(fakes, tmp_path):
    env = clean_env(ACCELERATE=fakes["accelerate"], FAKE_LOG=fakes["log"], OUTPUT_DIR="runs/a",
                    CHECKPOINT_DIR="s3://b/a", RUN_NAME="r1", CONFIG="configs/x.yaml",
                    ACCELERATE_ARGS="--mixed_precision fp16")
    r = subprocess.run([str(LAUNCH / "one_gpu.sh"), "--train.steps=3"], env=env, cwd=tmp_path,
                       timeout=TIMEOUT)
    assert r.returncode == 0
    (call,) = accelerate_calls(fakes)
    argv = call["argv"]
    assert argv[0] == "launch" and flag(argv, "--config_file") == "configs/accelerate/one_gpu.yaml"
    assert flag(argv, "--num_processes") == "1" and flag(argv, "--mixed_precision") == "fp16"
    assert argv[argv.index("launch/exit_status.py") + 1] == "tinydist/train.py"
    assert train_args(argv) == ["--config", "configs/x.yaml", "--train.output_dir=runs/a",
                                "--checkpoint.dir=s3://b/a", "--log.run_name=r1", "--train.steps=3"]


@pytest.mark.parametrize("env,expected", [
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),
    ({"NUM_GPUS": "2", "CUDA_VISIBLE_DEVICES": "0,1,2"}, "2"),
    ({"FAKE_SMI": "4"}, "4"),
    ({"FAKE_SMI": "fail"}, "1"),
])
def test_one_node_gpu_count(fakes, tmp_path, env, expected):
    script(fakes["accelerate"].parent / "nvidia-smi", """
        import os, sys
        n = os.environ.get("FAKE_SMI", "fail")
        if n == "fail":
            sys.exit(9)
        for i in range(int(n)):
            print(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})")
    """)
    e = clean_env(ACCELERATE=fakes["accelerate"], FAKE_LOG=fakes["log"], **env)
    e["PATH"] = f"{fakes['accelerate'].parent}{os.pathsep}{e['PATH']}"
    r = subprocess.run([str(LAUNCH / "one_node.sh")], env=e, cwd=tmp_path, timeout=TIMEOUT)
    assert r.returncode == 0
    (call,) = accelerate_calls(fakes)
    assert flag(call["argv"], "--num_processes") == expected
    assert flag(call["argv"], "--config_file") == "configs/accelerate/one_node.yaml"


def test_one_node_multi_machine_needs_rank_and_ip(fakes, tmp_path):
    env = clean_env(ACCELERATE=fakes["accelerate"], FAKE_LOG=fakes["log"], NUM_GPUS=8,
                    NUM_MACHINES=2)
    r = subprocess.run([str(LAUNCH / "one_node.sh")], env=env, cwd=tmp_path, timeout=TIMEOUT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "MACHINE_RANK" in r.stderr
    assert not fakes["log"].exists()


@pytest.mark.parametrize("rank_codes,expected", [
    ("75,75", 75), ("0,0", 0), ("2,75", 2), ("75,3", 3), ("75,0", 75), ("0,1", 1)])
def test_rank_codes_are_recovered(fakes, tmp_path, rank_codes, expected):
    """accelerate reports 1 for any failure; the launcher reports what the ranks said."""
    env = clean_env(ACCELERATE=fakes["accelerate"], FAKE_LOG=fakes["log"], NUM_GPUS=2,
                    FAKE_RANK_CODES=rank_codes)
    r = subprocess.run([str(LAUNCH / "one_node.sh")], env=env, cwd=tmp_path, timeout=TIMEOUT)
    assert r.returncode == expected


def test_no_rank_codes_keeps_accelerate_code(fakes, tmp_path):
    env = clean_env(ACCELERATE=fakes["accelerate"], FAKE_LOG=fakes["log"], FAKE_RC=137)
    r = subprocess.run([str(LAUNCH / "one_gpu.sh")], env=env, cwd=tmp_path, timeout=TIMEOUT)
    assert r.returncode == 137


@pytest.mark.parametrize("body,rank,expected", [
    ("import sys; sys.exit(75)", "3", 75),
    ("raise SystemExit(2)", "0", 2),
    ("pass", "1", 0),
    ("raise RuntimeError('boom')", "0", 1),
    ("import sys; sys.exit('bad config')", "0", 1),
    ("import os; os._exit(75)", "0", 75),
])
def test_exit_status_shim(tmp_path, body, rank, expected):
    train = tmp_path / "train.py"
    train.write_text(body + "\n")
    out = tmp_path / "codes"
    out.mkdir()
    r = subprocess.run([PY, str(LAUNCH / "exit_status.py"), str(train), "--a.b=1"],
                       env=clean_env(TINYDIST_EXIT_DIR=out, RANK=rank), timeout=TIMEOUT,
                       capture_output=True)
    assert r.returncode == expected
    assert (out / f"rank{rank}.code").read_text().strip() == str(expected)


def test_exit_status_shim_runs_script_as_main(tmp_path):
    train = tmp_path / "train.py"
    train.write_text(textwrap.dedent("""
        import sys, os, signal
        assert __name__ == "__main__" and sys.argv == [__file__, "--x=1"], sys.argv
        assert sys.path[0] == os.path.dirname(os.path.abspath(__file__))
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # un-ignored
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    """))
    r = subprocess.run(["bash", "-c", f"trap '' TERM INT USR1; exec {PY} \"$@\"", "x",
                        str(LAUNCH / "exit_status.py"), str(train), "--x=1"],
                       env=clean_env(), timeout=TIMEOUT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- spot_relaunch.sh

def spot(tmp_path, codes, args=(), **env):
    trainer = script(tmp_path / "trainer.py", COUNTING_TRAINER)
    sleeper = script(tmp_path / "sleep", """
        import os, sys
        with open(os.environ["SLEEP_LOG"], "a") as f:
            f.write(sys.argv[1] + "\\n")
    """)
    count = tmp_path / "count"
    e = clean_env(**{"TRAIN_CMD": f"{PY} {trainer}", "COUNT_FILE": count, "CODES": codes,
                     "SLEEP": sleeper, "SLEEP_LOG": tmp_path / "sleeps", "BACKOFF_S": 0,
                     "PREEMPT_DELAY_S": 0, "CHECKPOINT_DIR": "s3://bucket/run", **env})
    r = subprocess.run([str(LAUNCH / "spot_relaunch.sh"), *args], env=e, timeout=TIMEOUT,
                       capture_output=True, text=True)
    launches = int(count.read_text()) if count.exists() else 0
    sleeps = [int(s) for s in (tmp_path / "sleeps").read_text().split()] if (tmp_path / "sleeps").exists() else []
    return r, launches, sleeps


def test_spot_success_after_three_preemptions(tmp_path):
    r, launches, _ = spot(tmp_path, "75,75,75,0", args=["--train.steps=9"])
    assert (r.returncode, launches) == (0, 4), r.stderr
    calls = (tmp_path / "count.args").read_text().splitlines()
    # the bucket goes in as --checkpoint.dir, once (not again through the environment)
    assert all(eval(c) == (["--checkpoint.dir=s3://bucket/run", "--train.steps=9"], None)
               for c in calls)


def test_spot_config_error_stops_at_once(tmp_path):
    r, launches, sleeps = spot(tmp_path, "2", MAX_ATTEMPTS=5, BACKOFF_S=3)
    assert (r.returncode, launches, sleeps) == (2, 1, [])


def test_spot_crash_loop_is_bounded(tmp_path):
    r, launches, sleeps = spot(tmp_path, "1", MAX_ATTEMPTS=4, BACKOFF_S=5, MAX_BACKOFF_S=8)
    assert (r.returncode, launches) == (1, 4)
    assert sleeps == [5, 8, 8]  # doubling, capped; no sleep after the last launch


def test_spot_preemption_relaunches_fast_and_resets_backoff(tmp_path):
    r, launches, sleeps = spot(tmp_path, "1,1,75,1,0", BACKOFF_S=5, MAX_BACKOFF_S=100,
                               PREEMPT_DELAY_S=1)
    assert (r.returncode, launches) == (0, 5)
    assert sleeps == [5, 10, 1, 5]


def test_spot_needs_checkpoint_dir(tmp_path):
    r, launches, _ = spot(tmp_path, "0", CHECKPOINT_DIR="")
    assert (r.returncode, launches) == (2, 0) and "CHECKPOINT_DIR" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_spot_forwards_signal_and_does_not_relaunch(tmp_path, sig):
    trainer = script(tmp_path / "trainer.py", SIGNALLED_TRAINER)
    env = clean_env(TRAIN_CMD=f"{PY} {trainer}", STUB_DIR=tmp_path, CHECKPOINT_DIR="s3://b/r",
                    PREEMPT_DELAY_S=0, BACKOFF_S=0, MAX_ATTEMPTS=5)
    proc = subprocess.Popen([str(LAUNCH / "spot_relaunch.sh")], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(tmp_path / "ready0", proc)
        proc.send_signal(sig)  # to the loop only: it must forward it
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 75, err  # the child's code: it saved
    assert (tmp_path / "got0").read_text() == sig.name
    assert err.count("launch ") == 1, err  # no relaunch


# --------------------------------------------------------------------------- slurm.sbatch

def sbatch(fakes, tmp_path, args=(), **env):
    e = clean_env(**{"SRUN": fakes["srun"], "SCONTROL": fakes["scontrol"],
                     "ACCELERATE": fakes["accelerate"], "FAKE_LOG": fakes["log"],
                     "FAKE_SRUN_LOG": fakes["srun_log"], "FAKE_SCONTROL_LOG": fakes["scontrol_log"],
                     "SLURM_JOB_ID": 4242, "SLURM_NNODES": 2, "SLURM_JOB_NODELIST": "node[01-02]",
                     "SLURM_GPUS_PER_NODE": "a100:8", "SLURM_SUBMIT_DIR": ROOT, **env})
    r = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], env=e, cwd=tmp_path,
                       timeout=TIMEOUT, capture_output=True, text=True)
    requeues = fakes["scontrol_log"].read_text().splitlines() if fakes["scontrol_log"].exists() else []
    return r, requeues


@pytest.mark.parametrize("env,code,requeues", [
    ({"FAKE_RC": 75}, 0, ["requeue 4242"]),
    ({"FAKE_RANK_CODES": "75,75,75,75,75,75,75,75"}, 0, ["requeue 4242"]),  # accelerate says 1
    ({"FAKE_RC": 0}, 0, []),
    ({"FAKE_RC": 1}, 1, []),
    ({"FAKE_RC": 2}, 2, []),
    ({"FAKE_RANK_CODES": "2,2,2,2,2,2,2,2"}, 2, []),
    ({"FAKE_RANK_CODES": "75,75,75,75,75,75,75,3"}, 3, []),
])
def test_sbatch_requeues_only_on_75(fakes, tmp_path, env, code, requeues):
    r, got = sbatch(fakes, tmp_path, **env)
    assert r.returncode == code, r.stderr
    assert got == requeues


def test_sbatch_failed_requeue_exits_75(fakes, tmp_path):
    r, got = sbatch(fakes, tmp_path, FAKE_RC=75, FAKE_REQUEUE_RC=1)
    assert (r.returncode, got) == (75, ["requeue 4242"])


def test_sbatch_accelerate_args(fakes, tmp_path):
    r, _ = sbatch(fakes, tmp_path, args=["--train.steps=5"], CHECKPOINT_DIR="/shared/ckpt")
    assert r.returncode == 0, r.stderr
    (opts,) = [json.loads(l) for l in fakes["srun_log"].read_text().splitlines()]
    assert "--nodes=2" in opts and "--ntasks-per-node=1" in opts
    calls = accelerate_calls(fakes)
    assert [c["node"] for c in calls] == ["0", "1"]  # one accelerate launch per node
    for c in calls:
        argv = c["argv"]
        assert flag(argv, "--config_file") == "configs/accelerate/multi_node.yaml"
        assert flag(argv, "--machine_rank") == c["node"]
        assert flag(argv, "--main_process_ip") == "node01"
        assert flag(argv, "--main_process_port") == str(20000 + 4242)
        assert flag(argv, "--num_machines") == "2"
        assert flag(argv, "--num_processes") == "16"
        assert train_args(argv) == ["--config", "configs/tiny_imagenet_resnet18.yaml",
                                    "--checkpoint.dir=/shared/ckpt", "--train.steps=5"]


def test_sbatch_without_gpu_count_is_a_config_error(fakes, tmp_path):
    r, got = sbatch(fakes, tmp_path, SLURM_GPUS_PER_NODE="")
    assert (r.returncode, got) == (2, []) and not fakes["log"].exists()


# --------------------------------------------------------------------------- skypilot run block

def test_skypilot_run_block_args(fakes, tmp_path):
    task = yaml.safe_load((LAUNCH / "skypilot.yaml").read_text())
    env = clean_env(ACCELERATE=fakes["accelerate"], FAKE_LOG=fakes["log"],
                    **{k: v for k, v in task["envs"].items()},
                    SKYPILOT_NUM_NODES=2, SKYPILOT_NODE_RANK=1, SKYPILOT_NUM_GPUS_PER_NODE=8,
                    SKYPILOT_NODE_IPS="10.0.0.1\n10.0.0.2")
    env["TRAIN_ARGS"] = "--log.report_to=[wandb] --train.steps=7"
    r = subprocess.run(["bash", "-c", task["run"]], env=env, cwd=ROOT, timeout=TIMEOUT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (call,) = accelerate_calls(fakes)
    argv = call["argv"]
    assert flag(argv, "--machine_rank") == "1" and flag(argv, "--main_process_ip") == "10.0.0.1"
    assert flag(argv, "--num_machines") == "2" and flag(argv, "--num_processes") == "16"
    assert train_args(argv)[-2:] == ["--log.report_to=[wandb]", "--train.steps=7"]
    assert f"--checkpoint.dir={task['envs']['CHECKPOINT_DIR']}" in train_args(argv)


# --------------------------------------------------------------------------- real accelerate

def _real_accelerate():
    if shutil.which("accelerate", path=clean_env()["PATH"]) is None:
        pytest.skip("accelerate is not installed")


@pytest.mark.parametrize("code", [75, 2])
def test_real_accelerate_one_gpu_keeps_exit_code(tmp_path, code):
    """`accelerate launch` alone exits 1 for 75, 2 and 3 alike; one_gpu.sh must not."""
    _real_accelerate()
    trainer = script(tmp_path / "train.py", EXIT_TRAINER)
    r = subprocess.run([str(LAUNCH / "one_gpu.sh")], timeout=TIMEOUT, capture_output=True,
                       env=clean_env(TRAIN_SCRIPT=trainer, CODE=code))
    assert r.returncode == code, r.stderr[-2000:]


def test_real_accelerate_one_node_mixed_rank_codes(tmp_path):
    _real_accelerate()
    trainer = script(tmp_path / "train.py", EXIT_TRAINER)
    r = subprocess.run([str(LAUNCH / "one_node.sh")], timeout=TIMEOUT, capture_output=True,
                       env=clean_env(TRAIN_SCRIPT=trainer, NUM_GPUS=2, RANK_CODES="75,3"))
    assert r.returncode == 3, r.stderr[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_real_accelerate_one_gpu_signal_to_process_group(tmp_path, sig):
    """Ctrl-C / a VM shutdown signals the whole group: the trainer saves, the code is 75."""
    _real_accelerate()
    trainer = script(tmp_path / "train.py", SIGNALLED_TRAINER)
    proc = subprocess.Popen([str(LAUNCH / "one_gpu.sh")], start_new_session=True,
                            stderr=subprocess.PIPE, env=clean_env(TRAIN_SCRIPT=trainer,
                                                                  STUB_DIR=tmp_path))
    try:
        wait_for(tmp_path / "ready0", proc)
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-2000:]
    assert (tmp_path / "got0").read_text() == sig.name


def _descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_real_accelerate_usr1_to_every_process_like_slurm(tmp_path):
    """sbatch --signal=USR1@T (no B:) signals every process of the step, torchrun's workers and
    the launchers alike: the launchers must survive it and the ranks must save and exit 75."""
    _real_accelerate()
    trainer = script(tmp_path / "train.py", SIGNALLED_TRAINER)
    proc = subprocess.Popen([str(LAUNCH / "one_node.sh")], start_new_session=True,
                            stderr=subprocess.PIPE, env=clean_env(TRAIN_SCRIPT=trainer,
                                                                  STUB_DIR=tmp_path, NUM_GPUS=2))
    try:
        wait_for(tmp_path / "ready0", proc)
        wait_for(tmp_path / "ready1", proc)
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert (tmp_path / "got0").read_text() == "SIGUSR1"
    assert (tmp_path / "got1").read_text() == "SIGUSR1"


def test_real_accelerate_two_machines_on_localhost(tmp_path):
    """multi_node.yaml + the flags one_node.sh adds give one world of 2 over 2 'machines'."""
    _real_accelerate()
    import socket

    trainer = script(tmp_path / "train.py", """
        import os, sys
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.ones(1)
        dist.all_reduce(t)
        with open(os.path.join(os.environ["STUB_DIR"], f"rank{dist.get_rank()}"), "w") as f:
            f.write(f"{dist.get_world_size()} {t.item():.0f} {os.environ['GROUP_RANK']}")
        dist.destroy_process_group()
        sys.exit(75)
    """)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([str(LAUNCH / "one_node.sh")], stderr=subprocess.PIPE,
                              env=clean_env(TRAIN_SCRIPT=trainer, STUB_DIR=tmp_path, NUM_GPUS=1,
                                            NUM_MACHINES=2, MACHINE_RANK=rank,
                                            MAIN_PROCESS_IP="127.0.0.1", MAIN_PROCESS_PORT=port))
             for rank in (0, 1)]
    try:
        results = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [75, 75], [err[-2000:] for _, err in results]
    assert (tmp_path / "rank0").read_text() == "2 2 0"
    assert (tmp_path / "rank1").read_text() == "2 2 1"
