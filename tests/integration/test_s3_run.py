"""A whole run with its output dir (metrics, config, checkpoints, model) in an S3 bucket: moto's
server on 127.0.0.1 stands in for S3, reached through AWS_ENDPOINT_URL as a user's S3-compatible store
would be. The second start resumes from the bucket, as a new spot VM would."""

from __future__ import annotations

import json

import pytest

from helpers.faultinject import make_bucket, s3_env
from helpers.train import describe, run_train, tiny_args, train_env

pytestmark = pytest.mark.slow  # two training runs in subprocesses


@pytest.fixture
def s3(moto: str):
    """A fresh bucket on the module's moto server (conftest.py), a boto3 client and the environment a
    training process needs to reach it."""
    import boto3

    bucket = make_bucket(moto)
    return boto3.client("s3", endpoint_url=moto), bucket, s3_env(moto, max_attempts=None, retry_mode=None)


def test_run_in_a_bucket_resumes_from_it(s3, cache_dir):
    client, bucket, env = s3
    out = f"s3://{bucket}/run"
    # No best to keep: which of steps 3 and 5 scores higher on a 5-step run is float noise (it changed with
    # the installed packages), and this test is about keep_last deleting on the bucket.
    args = tiny_args(cache_dir, out, checkpoint__every_steps=2, checkpoint__keep_last=2, checkpoint__best_metric="none")
    first = run_train(args + ["--train.max_steps=3"], env=train_env(env))
    assert first.returncode == 0, describe(first)
    second = run_train(args + ["--train.max_steps=5"], env=train_env(env))
    assert second.returncode == 0, describe(second)
    assert f"resumed from {out}/checkpoints/step-00000003 at step 3" in second.stdout, describe(second)

    keys = {obj["Key"] for obj in client.list_objects_v2(Bucket=bucket)["Contents"]}
    committed = sorted(k.split("/")[2] for k in keys if k.endswith("/COMMITTED"))
    assert committed == ["step-00000004", "step-00000005"], committed  # keep_last=2 deleted step 3 on the bucket
    assert not any(k.startswith("run/checkpoints/step-00000003/") for k in keys)
    assert {"run/config.yaml", "run/model/model.safetensors.index.json"} <= keys
    metrics = [json.loads(line) for line in
               client.get_object(Bucket=bucket, Key="run/metrics.jsonl")["Body"].read().decode().splitlines()]
    train_steps = [m["step"] for m in metrics if "train/loss" in m]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 5, train_steps  # one file, continued
    assert [(m["event"], m["step"]) for m in metrics if "event" in m] == [("resumed", 3)]
