"""What a user reads: a live bar in a terminal, plain lines in a log file; the error last; a warning
when accelerate formed fewer processes than it was asked for."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest

from tinydist.loop.console import Console
from helpers.train import PYTHON, describe, run, run_train, tiny_args, train_env

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step \d+/\d+ epoch ")


def test_log_file_gets_plain_timestamped_progress_lines_at_an_interval():
    out = io.StringIO()
    with redirect_stdout(out):
        console = Console(True, total=100, start=0, interval_s=3600, tty=False)
        console.start_progress()
        for step in range(1, 101):
            console.progress(step, step / 10, **({"loss": "1.0"} if step % 10 == 0 else {}))
            if step == 50:
                console.say("step 50: val top-1 0.5")
        console.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    progress = [line for line in lines if STAMP.match(line)]
    assert len(progress) == 1 and progress[0].endswith("loss 1.0 eta 0:00:00")  # only the last step, in an hour
    assert "step 50: val top-1 0.5" in lines  # a message is a line of its own


def test_a_progress_line_never_repeats_a_stale_loss_as_news():
    out = io.StringIO()
    with redirect_stdout(out):
        console = Console(True, total=100, start=0, interval_s=0, tty=False)
        console.start_progress(total=30, start=5)  # resumed at step 5
        console.progress(10, 1.0, loss="0.9")
        console.progress(15, 1.5)  # nothing logged since step 10
        console.progress(16, 1.6)
        console.close()
    lines = [line.split(" ", 2)[2] for line in out.getvalue().splitlines() if STAMP.match(line)]
    assert lines[0].startswith("step 10/30 epoch 1.00 loss 0.9 eta"), lines
    assert lines[1].startswith("step 15/30 epoch 1.50 eta"), lines  # already shown at step 10: not again
    assert lines[2].startswith("step 16/30 epoch 1.60 eta"), lines


def test_a_progress_line_dates_a_loss_logged_before_its_step():
    out = io.StringIO()
    with redirect_stdout(out):
        console = Console(True, total=100, start=0, interval_s=0, tty=False)
        console.start_progress()
        console.progress(1, 0.1)
        console._last_line = float("inf")  # the interval has not passed: no line at step 10
        console.progress(10, 1.0, loss="0.9")
        console._last_line = 0.0
        console.progress(12, 1.2)
        console.close()
    lines = [line.split(" ", 2)[2] for line in out.getvalue().splitlines() if STAMP.match(line)]
    assert lines[-1].startswith("step 12/100 epoch 1.20 loss 0.9 (at step 10) eta"), lines


def test_inactive_ranks_print_nothing():
    out = io.StringIO()
    with redirect_stdout(out):
        console = Console(False, total=10, start=0, interval_s=0, tty=False)
        console.say("hello")
        console.progress(10, 1.0, loss="1")
    assert out.getvalue() == ""


@pytest.mark.slow
def test_a_redirected_run_has_no_bar_redraws(tmp_path, cache_dir):
    env = train_env(unset=["TQDM_DISABLE"])  # the bar would be on, if this were a terminal
    result = run_train(tiny_args(cache_dir, str(tmp_path / "out"), train__max_steps=6), env=env)
    assert result.returncode == 0, describe(result)
    assert "\r" not in result.stdout + result.stderr
    progress = [line for line in result.stdout.splitlines() if STAMP.match(line)]
    assert len(progress) == 1 and progress[0].split()[3] == "6/6", result.stdout  # the last step; < 30 s run


@pytest.mark.slow
def test_the_error_is_the_last_thing_the_launcher_prints(tmp_path, cache_dir):
    args = tiny_args(cache_dir, str(tmp_path / "out"), train__micro_batch_size=48)
    result = run([PYTHON, "-m", "tinydist.launch", "tinydist/train.py", *args], train_env(), timeout=240)
    assert result.returncode == 2, describe(result)
    last = result.stderr.strip().splitlines()[-2:]
    assert last[0].startswith("error: train.global_batch_size 64 is not a multiple") and \
        last[1] == "tinydist.launch: training exited with 2", last


@pytest.mark.slow
def test_warns_when_accelerate_formed_fewer_processes_than_asked(tmp_path, cache_dir):
    args = tiny_args(cache_dir, str(tmp_path / "out"), train__max_steps=1)
    cmd = [PYTHON, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "tinydist/train.py", *args]
    result = run(cmd, train_env(), timeout=240)
    assert result.returncode == 0, describe(result)
    assert "warning: accelerate was asked for --num_processes 2 but 1 process(es) formed: add --multi_gpu" \
        in result.stdout, describe(result)


@pytest.mark.slow
def test_main_command_offline_ends_with_tinydists_message_in_seconds(tmp_path):
    from helpers.faultinject import free_port

    env = train_env({"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, unset=["HF_HUB_OFFLINE"])  # nobody there
    cmd = [PYTHON, "-m", "tinydist.train", "--config", "configs/tiny_imagenet_resnet18.yaml",
           f"--train.output_dir={tmp_path / 'out'}", f"--data.cache_dir={tmp_path / 'cache'}"]
    result = run(cmd, env, timeout=120)
    assert result.returncode == 69, describe(result)
    last = result.stderr.strip().splitlines()[-2:]
    assert last[0].startswith("error: cannot reach the Hugging Face hub for `zh-plus/tiny-imagenet`"), last
    assert "configs/smoke.yaml" in last[0] and "Retrying" not in result.stderr
