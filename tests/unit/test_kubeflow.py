"""launch/kubeflow/: the Trainer v2 TrainJob (+ its TrainingRuntime) and the v1 elastic PyTorchJob.

No cluster here. Each document is loaded into the published API models (kubeflow-trainer-api's
pydantic models; kubeflow-training's v1 models through its own ApiClient deserializer, as its
TrainingClient reads jobs), with one thing those loaders do not do: a key the model does not know
is an error (the generated loaders drop it silently; an API server would too, or reject it), so a
misspelt field cannot pass. Then what the files say is checked against tinydist itself: the
command is tinydist.launch under torchrun's parser with the platform's PET_* environment, the
training arguments load as a tinydist config, the exit-code rules keep the contract.
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path

import pytest
import yaml

from tinydist.config import load_config
from tinydist.runtime.exitcodes import EXIT_CONFIG, EXIT_PREEMPTED, EXIT_TRANSIENT

ROOT = Path(__file__).resolve().parents[2]
KUBEFLOW = ROOT / "launch" / "kubeflow"
IMAGE_ROOT = "/workspace/tinydist"  # where both files say the image holds the repository

trainer_models = pytest.importorskip(
    "kubeflow_trainer_api.models", reason="kubeflow-trainer-api is not installed (pip install -e .[test])")
training = pytest.importorskip(
    "kubeflow.training", reason="kubeflow-training is not installed (pip install -e .[test])")
from kubeflow.training.utils.utils import FakeResponse  # noqa: E402  (after the skip)
from pydantic import BaseModel  # noqa: E402  (kubeflow-trainer-api's dependency)


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KUBEFLOW / name).read_text()))


def trainjob_docs() -> tuple[dict, dict]:
    docs = {d["kind"]: d for d in documents("trainjob.yaml")}
    assert set(docs) == {"TrainingRuntime", "TrainJob"}, sorted(docs)
    return docs["TrainingRuntime"], docs["TrainJob"]


def pytorchjob_doc() -> dict:
    (doc,) = documents("pytorchjob.yaml")
    return doc


# --------------------------------------------------------------------------- strict loading

def unknown_pydantic(model: type[BaseModel], data: typing.Any, path: str = "") -> list[str]:
    """Paths of keys in `data` that `model` (an OpenAPI-generated pydantic model) has no field for."""
    if not isinstance(data, dict) or "actual_instance" in model.model_fields:  # oneOf wrappers hold scalars
        return []
    fields = {f.alias or name: f.annotation for name, f in model.model_fields.items()}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(f"{path}.{key}")
        else:
            found += _unknown_in(fields[key], value, f"{path}.{key}")
    return found


def _unknown_in(annotation: typing.Any, value: typing.Any, path: str) -> list[str]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        (inner,) = [a for a in args if a is not type(None)]
        return _unknown_in(inner, value, path)
    if origin is list and isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _unknown_in(args[0], v, f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict):
        return [p for k, v in value.items() for p in _unknown_in(args[1], v, f"{path}.{k}")]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return unknown_pydantic(annotation, value, path)
    return []


def unknown_openapi(type_name: str, data: typing.Any, path: str = "") -> list[str]:
    """The same for kubeflow-training's (OpenAPI generator, kubernetes-client style) model names."""
    if m := re.fullmatch(r"list\[(.*)\]", type_name):
        return [p for i, v in enumerate(data or []) for p in unknown_openapi(m.group(1), v, f"{path}[{i}]")]
    if m := re.fullmatch(r"dict\(([^,]*), (.*)\)", type_name):
        return [p for k, v in (data or {}).items() for p in unknown_openapi(m.group(2), v, f"{path}.{k}")]
    model = getattr(training.models, type_name, None)
    if model is None or not isinstance(data, dict):  # str, int, bool, object (IntOrString, ...)
        return []
    attrs = {json_key: attr for attr, json_key in model.attribute_map.items()}
    found = []
    for key, value in data.items():
        if key not in attrs:
            found.append(f"{path}.{key}")
        else:
            found += unknown_openapi(model.openapi_types[attrs[key]], value, f"{path}.{key}")
    return found


def load_trainer(model_name: str, doc: dict):
    model = getattr(trainer_models, model_name)
    assert unknown_pydantic(model, doc) == []
    return model.from_dict(doc)  # types, required fields


def load_pytorchjob(doc: dict):
    assert unknown_openapi("KubeflowOrgV1PyTorchJob", doc) == []
    # types and required fields (the model setters check them)
    return training.ApiClient().deserialize(FakeResponse(doc), "KubeflowOrgV1PyTorchJob")


def test_trainjob_file_loads_into_the_trainer_api_models():
    runtime, job = trainjob_docs()
    rt = load_trainer("TrainerV1alpha1TrainingRuntime", runtime)
    tj = load_trainer("TrainerV1alpha1TrainJob", job)
    assert rt.api_version == tj.api_version == "trainer.kubeflow.org/v1alpha1"
    assert tj.spec.trainer.num_nodes >= 1 and tj.spec.trainer.image
    assert tj.spec.trainer.resources_per_node.limits["nvidia.com/gpu"].actual_instance == "8"


def test_pytorchjob_file_loads_into_the_v1_model():
    job = load_pytorchjob(pytorchjob_doc())
    assert type(job).__name__ == "KubeflowOrgV1PyTorchJob" and job.api_version == "kubeflow.org/v1"
    assert job.spec.elastic_policy.rdzv_backend == "c10d"
    worker = job.spec.pytorch_replica_specs["Worker"]
    assert worker.template.spec.containers[0].env[0].value_from.secret_key_ref.name == "wandb"


def _set(doc: dict, path: str, value: typing.Any) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return doc


def _rename(doc: dict, path: str, new: str) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[new] = node.pop(last)
    return doc


@pytest.mark.parametrize("path,typo", [
    ("spec.trainer.numNodes", "numNode"),
    ("spec.trainer.env.0.valueFrom.secretKeyRef", "secretKeyref"),
    ("spec.runtimeRef", "runtimeRefs"),
])
def test_a_misspelt_trainjob_field_is_caught(path, typo):
    _, job = trainjob_docs()
    (found,) = unknown_pydantic(trainer_models.TrainerV1alpha1TrainJob, _rename(job, path, typo))
    assert found.endswith("." + typo)


def test_a_misspelt_runtime_field_is_caught():
    runtime, _ = trainjob_docs()
    job = "spec.template.spec.replicatedJobs.0.template.spec"
    bad = _rename(runtime, f"{job}.podFailurePolicy", "podFailurePolicies")
    assert unknown_pydantic(trainer_models.TrainerV1alpha1TrainingRuntime, bad) == [
        ".spec.template.spec.replicatedJobs[0].template.spec.podFailurePolicies"]


@pytest.mark.parametrize("path,typo", [
    ("spec.elasticPolicy.maxRestarts", "maxRestart"),
    ("spec.pytorchReplicaSpecs.Worker.template.spec.containers.0.workingDir", "workdir"),
])
def test_a_misspelt_pytorchjob_field_is_caught(path, typo):
    bad = _rename(pytorchjob_doc(), path, typo)
    (found,) = unknown_openapi("KubeflowOrgV1PyTorchJob", bad)
    assert found.endswith("." + typo)


def test_a_wrong_type_is_caught():
    _, job = trainjob_docs()
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        trainer_models.TrainerV1alpha1TrainJob.from_dict(_set(job, "spec.trainer.numNodes", "two"))
    with pytest.raises(ValueError):  # a required field missing: the v1 model's setter refuses it
        load_pytorchjob(_set(pytorchjob_doc(), "spec.pytorchReplicaSpecs.Worker.template.spec.containers.0.name", None))


def test_the_commented_spot_example_is_a_valid_patch():
    text = (KUBEFLOW / "trainjob.yaml").read_text()
    block = re.search(r"# BEGIN spot example\n(.*?)\n\s*# END spot example", text, re.S).group(1)
    patch = yaml.safe_load("\n".join(re.sub(r"^\s*# ?", "", line) for line in block.splitlines()))
    _, job = trainjob_docs()
    job["spec"].update(patch)
    tj = load_trainer("TrainerV1alpha1TrainJob", job)
    (p,) = tj.spec.runtime_patches
    (rj,) = p.training_runtime_spec.template.spec.replicated_jobs
    pod = rj.template.spec.template.spec
    assert rj.name == "node" and pod.node_selector and pod.tolerations[0].effect == "NoSchedule"


# --------------------------------------------------------------------------- the exit-code contract

def job_action(rules: list[dict], container: str, code: int) -> str:
    """What the Kubernetes Job controller does with a pod whose container exited with `code`: the first
    matching podFailurePolicy rule's action, else Count (pkg/controller/job/pod_failure_policy.go)."""
    for rule in rules:
        req = rule.get("onExitCodes")
        if req is None or req.get("containerName", container) != container:
            continue
        if (code in req["values"]) == (req["operator"] == "In"):
            return rule["action"]
    return "Count"


def test_trainjob_runtime_keeps_the_exit_code_contract():
    runtime, job = trainjob_docs()
    ref = job["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"]) == ("TrainingRuntime", runtime["metadata"]["name"])
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    assert "torch" in runtime["spec"]["mlPolicy"]  # the PET_* variables come from the torch plugin
    (rj,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    # the names the torch plugin and the TrainJob's trainer are matched by
    assert rj["name"] == "node"
    assert rj["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    spec, pod = rj["template"]["spec"], rj["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert pod["restartPolicy"] == "Never"  # the API refuses a podFailurePolicy otherwise
    rules = spec["podFailurePolicy"]["rules"]
    assert job_action(rules, "node", EXIT_CONFIG) == "FailJob"
    assert job_action(rules, "node", EXIT_PREEMPTED) == "Ignore"
    assert job_action(rules, "node", EXIT_TRANSIENT) == "Count"  # relaunched with the Job's backoff
    assert job_action(rules, "node", 1) == "Count"
    assert 0 < spec["backoffLimit"] < 100  # crashes and 69 are bounded
    assert {"type": "DisruptionTarget"} in next(r["onPodConditions"] for r in rules if "onPodConditions" in r)
    assert pod["terminationGracePeriodSeconds"] > _torch_shutdown_timeout()


def _torch_shutdown_timeout() -> int:
    """The grace torchrun's agent gives the ranks after SIGTERM, as tinydist.launch sets it."""
    source = (ROOT / "tinydist" / "runtime" / "launch.py").read_text()
    return int(re.search(r'setdefault\("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "(\d+)"\)', source).group(1))


def operator_restarts(policy: str, code: int) -> bool:
    """Whether the v1 training operator restarts a replica that exited with `code`
    (pkg/controller.v1/common/pod.go: ExitCode retries only codes >= 128, IsRetryableExitCode)."""
    return policy in ("OnFailure", "Always") or (policy == "ExitCode" and code >= 128)


def test_pytorchjob_relaunches_on_75_and_69_and_is_bounded():
    doc = pytorchjob_doc()
    spec = doc["spec"]
    assert set(spec["pytorchReplicaSpecs"]) == {"Worker"}  # elastic: the c10d rendezvous, no Master
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    policy = worker["restartPolicy"]
    assert operator_restarts(policy, EXIT_PREEMPTED) and operator_restarts(policy, EXIT_TRANSIENT)
    assert not operator_restarts("ExitCode", EXIT_PREEMPTED)  # why not ExitCode (see the file)
    assert 0 < spec["runPolicy"]["backoffLimit"] < 100
    ep = spec["elasticPolicy"]
    assert 1 <= ep["minReplicas"] <= ep["maxReplicas"] == worker["replicas"]
    assert ep["rdzvBackend"] == "c10d" and ep["maxRestarts"] >= 1
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"  # the operator injects its variables into this one
    # without rdzvPort the rendezvous endpoint is worker 0's port of this name
    assert "rdzvPort" in ep or any(p["name"] == "pytorchjob-port" for p in container["ports"])
    assert pod["terminationGracePeriodSeconds"] > _torch_shutdown_timeout()


# --------------------------------------------------------------------------- the command inside

def container_of(name: str) -> tuple[dict, Path]:
    """The training container (TrainJob: its trainer) and the folder its relative paths are from."""
    if name == "trainjob.yaml":
        return trainjob_docs()[1]["spec"]["trainer"], Path("/")
    (c,) = pytorchjob_doc()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    return c, Path(c["workingDir"])


def in_repo(path: str, cwd: Path) -> Path:
    """A path in the image, as the same file in this checkout."""
    absolute = (cwd / path).as_posix()
    assert absolute.startswith(IMAGE_ROOT + "/"), absolute
    return ROOT / absolute[len(IMAGE_ROOT) + 1:]


@pytest.mark.parametrize("name", ["trainjob.yaml", "pytorchjob.yaml"])
def test_command_is_tinydist_launch_with_a_valid_config(name):
    c, cwd = container_of(name)
    argv = c["command"] + c["args"]
    assert argv[:4] == ["python", "-m", "tinydist.launch", "--torchrun"], argv
    script, train_args = argv[4], argv[5:]
    assert in_repo(script, cwd) == ROOT / "tinydist" / "train.py"
    i = train_args.index("--config")
    local = train_args[:i + 1] + [str(in_repo(train_args[i + 1], cwd))] + train_args[i + 2:]
    cfg = load_config(local)  # unknown keys and bad values raise ConfigError
    assert cfg.checkpoint.dir.startswith("s3://")  # a pod's disk does not outlive it
    assert "wandb" in cfg.log.report_to
    env = {e["name"]: e for e in c["env"]}
    ref = env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]
    # the secret the README tells to create
    readme = (ROOT / "README.md").read_text()
    assert f"kubectl create secret generic {ref['name']} --from-literal={ref['key']}=" in readme
    assert env["ACCELERATE_MIXED_PRECISION"]["value"] == "bf16"
    assert not [k for k in env if k.startswith("PET_")]  # the platform's (Trainer refuses them)


PET_TRAINJOB = {  # what Trainer's torch plugin sets (pkg/runtime/framework/plugins/torch/torch.go)
    "PET_NNODES": "2", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "1",
    "PET_MASTER_ADDR": "tinydist-node-0-0.tinydist", "PET_MASTER_PORT": "29500"}
PET_PYTORCHJOB = {  # what the v1 operator sets from elasticPolicy (pkg/controller.v1/pytorch/elastic.go)
    "PET_NNODES": "1:2", "PET_NPROC_PER_NODE": "8", "PET_RDZV_BACKEND": "c10d",
    "PET_RDZV_ENDPOINT": "tinydist-worker-0:23456", "PET_RDZV_ID": "tinydist", "PET_MAX_RESTARTS": "3"}


@pytest.mark.parametrize("name,pet", [("trainjob.yaml", PET_TRAINJOB), ("pytorchjob.yaml", PET_PYTORCHJOB)])
def test_torchrun_takes_the_platform_environment(name, pet, monkeypatch):
    """tinydist.launch --torchrun hands the rest of its argv to torchrun's own parser: under the
    variables the platform sets, the command in the file becomes the right rendezvous with no flag."""
    import torch.distributed.run as torchrun

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args sets it when absent: keep ours
    for key, value in pet.items():
        monkeypatch.setenv(key, value)
    c, _ = container_of(name)
    argv = c["command"] + c["args"]
    args = torchrun.get_args_parser().parse_args(argv[argv.index("--torchrun") + 1:])
    assert args.training_script_args == c["args"]  # the training's arguments, untouched
    config, _, _ = torchrun.config_from_args(args)
    lo, _, hi = pet["PET_NNODES"].partition(":")
    assert (config.min_nodes, config.max_nodes) == (int(lo), int(hi or lo))
    assert config.nproc_per_node == 8
    if name == "trainjob.yaml":
        assert args.node_rank == 1 and config.rdzv_backend == "static"
        assert config.rdzv_endpoint == "tinydist-node-0-0.tinydist:29500"
    else:
        assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "tinydist-worker-0:23456"
        assert config.max_restarts == pytorchjob_doc()["spec"]["elasticPolicy"]["maxRestarts"]
