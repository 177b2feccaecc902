"""Named tensor sets: what a checkpoint holds besides its record, and how each one goes to and from
the objects of a run. A set is a module (its state_dict: `model`, `ema`) or an optimizer (its state
as {"{param name}.{key}": tensor}, its JSON — type, param groups by parameter name, scalars — in the
record under the set's name). Each is written as its own sharded set (layout.py); none rides inside
another. Loading reads and checks every set before it touches any: a failed load changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch

from tinydist.ckpt.layout import CheckpointError, Sealed, index_name, is_number, tensor_sets
from tinydist.ckpt.record import STATE

TensorSet = Union[torch.nn.Module, torch.optim.Optimizer]
# Sets a checkpoint may lack: a run may turn ema.enabled on mid-way (the average then starts from the
# weights, train.py). Any other set asked for and missing is an error: a resume without its optimizer
# state would not retrace the run.
OPTIONAL = frozenset({"ema"})


@dataclass
class Capture:
    """One set's tensors for the host snapshot (snapshot.py), split by what changes them next."""
    now: dict[str, torch.Tensor]  # changed by the next forward (BN buffers): copied inside save()
    later: dict[str, torch.Tensor]  # changed only by the next optimizer step: copied meanwhile
    order: list[str]  # the set's own key order, which decides how it is sharded


def capture(label: str, sets: Mapping[str, Optional[TensorSet]]) -> tuple[dict[str, Capture], dict[str, Any]]:
    """The tensors of every set given (None: not saved), and the JSON sections of its optimizers."""
    captures, sections = {}, {}
    for name, value in sets.items():
        if value is None:
            continue
        if isinstance(value, torch.nn.Module):
            state = value.state_dict()
            buffers = {n for n, _ in value.named_buffers()}
            captures[name] = Capture({k: v for k, v in state.items() if k in buffers},
                                     {k: v for k, v in state.items() if k not in buffers}, list(state))
        elif isinstance(value, torch.optim.Optimizer):
            tensors, sections[name] = flatten_optimizer(label, _model_of(name, sets), value)
            captures[name] = Capture({}, tensors, list(tensors))
        else:
            raise TypeError(f"{label}: set {name!r} is a {type(value).__name__}; expected a torch module or optimizer")
    return captures, sections


def _model_of(name: str, sets: Mapping[str, Optional[TensorSet]]) -> torch.nn.Module:
    model = sets.get("model")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"set {name!r} is an optimizer but sets['model'] is {type(model).__name__}; expected "
                        "the (unwrapped) module whose parameters it optimizes, to name its state by")
    return model


def stage(folder: Sealed, record: dict, sets: Mapping[str, Optional[TensorSet]]) -> list[Callable[[], None]]:
    """Read and check every set asked for (None: not loaded) against its target; the loads to apply,
    in order, once all have passed. A set in OPTIONAL that the checkpoint lacks is left as it is."""
    label, held, loads = folder.label, tensor_sets(record), []
    for name, target in sets.items():
        if target is None:
            continue
        if name not in held:
            if name in OPTIONAL:
                continue
            raise CheckpointError(f"{label}: holds no {name} set ({index_name(name)} is not listed in {STATE}); "
                                  f"expected one for the {type(target).__name__} being loaded")
        tensors = folder.tensors(name)
        if isinstance(target, torch.nn.Module):
            check_fits(label, name, tensors, target.state_dict())
            loads.append(lambda t=target, s=tensors: t.load_state_dict(s, strict=True))
        else:
            state = unflatten_optimizer(label, record.get(name), tensors, _model_of(name, sets), target)
            loads.append(lambda t=target, s=state: t.load_state_dict(s))  # casts to each param's device
    return loads


def check_fits(label: str, name: str, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Saved tensors must be exactly the module's state_dict: same keys, shapes and dtypes."""
    hint = "saved with another model.stem or number of classes?"
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{label}: {name} tensors missing from the checkpoint {missing[:3]} "
                              f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all); "
                              f"expected exactly the model's state_dict keys ({hint})")
    for key, want in expected.items():
        got = saved[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{label}: tensor {key} has shape {tuple(got.shape)} {got.dtype} in "
                                  f"the checkpoint but the model expects {tuple(want.shape)} {want.dtype}; {hint}")


# ---- optimizer state <-> tensors + JSON ------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    # lr and betas may hold 0-d tensors (capturable optimizers); JSON holds their value.
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value.item() if torch.is_tensor(value) else value


def flatten_optimizer(label: str, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as {"{param name}.{key}": tensor} plus JSON (type, groups by param name, scalars)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, groups, extra = {}, [], {}
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError(f"{label}: the optimizer holds a parameter that is not in "
                                      "model.named_parameters(); expected the (unwrapped) model it optimizes")
            pname = names[id(p)]
            group_names.append(pname)
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{pname}.{key}"] = value
                else:
                    extra.setdefault(pname, {})[key] = _jsonable(value)
        groups.append({**{k: _jsonable(v) for k, v in group.items() if k != "params"}, "params": group_names})
    as_json = {"type": type(optimizer).__name__, "param_groups": groups, "extra_state": extra}
    try:  # a private copy, in JSON now: fail in the caller, not in a background thread
        return tensors, json.loads(json.dumps(as_json))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{label}: optimizer hyper-parameters or state are not JSON-serialisable "
                              f"({e}); expected numbers, bools, strings and tensors") from e


def _restore_group_value(label: str, index: int, key: str, live: Any, saved: Any) -> Any:
    """A saved hyper-parameter, checked against the live one's kind and turned back into its type."""
    bad = f"{label}: optimizer param group {index} `{key}` = {saved!r} "
    if isinstance(live, bool) or live is None or isinstance(live, str):
        if type(saved) is not type(live):
            raise CheckpointError(bad + f"; expected {type(live).__name__} like the optimizer's {live!r}")
        return saved
    if isinstance(live, (tuple, list)):
        if not isinstance(saved, list) or len(saved) != len(live) or not all(map(is_number, saved)):
            raise CheckpointError(bad + f"; expected {len(live)} finite numbers like {list(live)}")
        return tuple(saved) if isinstance(live, tuple) else saved
    if isinstance(live, (int, float)) or torch.is_tensor(live):
        if not is_number(saved) or (key == "lr" and saved < 0):
            raise CheckpointError(bad + "; expected a finite number" + (" >= 0" if key == "lr" else ""))
        if torch.is_tensor(live):
            return torch.tensor(saved, dtype=live.dtype, device=live.device)
        return saved
    return saved


def unflatten_optimizer(label: str, saved: Any, tensors: dict[str, torch.Tensor], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict:
    """torch's optimizer state_dict for `optimizer`, from a checkpoint's JSON and tensors, every value
    checked: same type, same groups of the same parameters, each state tensor the shape of its
    parameter (a scalar only for `step`), floating point and finite-typed, hyper-parameters typed."""
    if not isinstance(saved, dict) or saved.get("type") != type(optimizer).__name__:
        kind = saved.get("type") if isinstance(saved, dict) else saved
        raise CheckpointError(f"{label}: optimizer state was saved from {kind}; "
                              f"expected {type(optimizer).__name__} (the optimizer being loaded)")
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    current = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    saved_groups = saved.get("param_groups")
    if not isinstance(saved_groups, list) or not all(isinstance(g, dict) for g in saved_groups) \
            or [g.get("params") for g in saved_groups] != current:
        sizes = [len(g.get("params") or []) for g in saved_groups] if isinstance(saved_groups, list) else None
        raise CheckpointError(
            f"{label}: optimizer param groups differ (saved sizes {sizes}, optimizer has "
            f"{[len(g) for g in current]}); expected the same parameters in the same groups")
    number = {n: i for i, n in enumerate(n for group in current for n in group)}  # torch numbers params in order
    extra_state = saved.get("extra_state", {})
    if not isinstance(extra_state, dict) or not all(isinstance(v, dict) for v in extra_state.values()):
        raise CheckpointError(f"{label}: optimizer extra_state is malformed; expected {{param: {{key: value}}}}")
    values = list(tensors.items())
    values += [(f"{p}.{k}", v) for p, extra in extra_state.items() for k, v in extra.items()]
    torch_state: dict[int, dict[str, Any]] = {}
    for full_key, value in values:
        pname, _, key = full_key.rpartition(".")  # state keys (exp_avg, step...) have no dots; names do
        if pname not in number:
            raise CheckpointError(f"{label}: optimizer state {key!r} is for parameter {pname!r} which "
                                  "the optimizer does not have; expected state only for the optimizer's parameters")
        param = params[pname]
        if torch.is_tensor(value):
            scalar_step = key == "step" and value.dim() == 0
            if not scalar_step and (value.shape != param.shape or not value.dtype.is_floating_point):
                raise CheckpointError(f"{label}: optimizer state {full_key} is {tuple(value.shape)} "
                                      f"{value.dtype}; expected {tuple(param.shape)} floating point like the parameter")
            if scalar_step and not (is_number(value.item()) and value.item() >= 0):
                raise CheckpointError(f"{label}: optimizer state {full_key} = {value.item()}; "
                                      "expected a step count >= 0")
        elif not (value is None or (key == "step" and is_number(value) and value >= 0)):
            raise CheckpointError(f"{label}: optimizer state {full_key} = {value!r}; "
                                  "expected a tensor (or a step count)")
        torch_state.setdefault(number[pname], {})[key] = value
    groups = []
    for index, (live, group) in enumerate(zip(optimizer.param_groups, saved_groups)):
        missing = sorted(set(live) - set(group) - {"params"})
        if missing:
            raise CheckpointError(f"{label}: optimizer param group {index} lacks {missing}; "
                                  "expected every hyper-parameter of the optimizer")
        restored = {k: _restore_group_value(label, index, k, live.get(k), v)
                    for k, v in group.items() if k != "params"}
        groups.append({**restored, "params": [number[n] for n in group["params"]]})
    return {"state": torch_state, "param_groups": groups}
