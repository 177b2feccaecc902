"""What the main process tells the world: metrics.jsonl and the trackers (W&B, TensorBoard).

The W&B run id is kept in the checkpoint, so a resumed job, on any machine, continues the same
run: one curve, not two halves. The metrics file is cut back to the checkpoint's step on resume,
so steps replayed after a hard kill are not written twice.

Trackers are best-effort: a dashboard must never stop (or stall) a training run. One that cannot
start within `log.tracker_timeout_s` falls back (W&B: offline, same run id, `wandb sync` later) or is
dropped, with one warning; one whose log raises is dropped, with one warning. metrics.jsonl, which
the report and the resume rely on, is written either way. The one tracker failure that stops a run
is decided before any data is loaded, without a network call: WANDB_MODE=online and no API key.
"""

from __future__ import annotations

import configparser
import json
import netrc
import os
import re
import secrets
import string
from typing import Any, Optional
from urllib.parse import urlsplit

import fsspec

from tinydist.config import Config, ConfigError, to_dict
from tinydist.runtime.divergence import finite_or_none
from tinydist.runtime.quote import first_line
from tinydist.ckpt.storage import Storage, StorageError

WANDB_DEFAULT_URL = "https://api.wandb.ai"


def is_local(url: str) -> bool:
    return fsspec.core.url_to_fs(url)[0].protocol in ("file", ("file", "local"), "local")


def local_staging_dir(output_dir: str) -> str:
    """Trackers write local files; for a bucket output dir they live here (W&B syncs them itself)."""
    if is_local(output_dir):
        return os.path.abspath(os.path.expanduser(output_dir))
    return os.path.join(os.path.expanduser("~/.cache/tinydist/runs"), re.sub(r"[^\w.-]+", "_", output_dir))


def tracker_timeout_s(cfg: Config) -> float:
    """Longest a tracker may hold up training, at its start and at its end. wandb's own default
    (init_timeout 90 s, plus retries) held a run ~100 s offline; `log.tracker_timeout_s` (20 s), plus the
    offline start after it (~2 s measured), keeps a fallback under 30 s."""
    return float(cfg.log.tracker_timeout_s)


def _env_seconds(name: str, bound: float) -> float:
    """wandb's own timeout variable when it asks for less than `bound`: never more, since our explicit
    setting overrides the variable and a user who shortened it expects it honoured."""
    try:
        return min(bound, float(os.environ.get(name) or bound))
    except ValueError:
        return bound


def wandb_mode() -> Optional[str]:
    """WANDB_MODE as wandb reads it (`dryrun` is offline; `run` and `shared` need the server, as
    online does), or None when unset."""
    mode = (os.environ.get("WANDB_MODE") or "").strip().lower()
    return {"dryrun": "offline", "run": "online", "shared": "online"}.get(mode, mode) or None


def _netrc_path() -> str:
    # wandb's order (wandb/sdk/lib/wbauth/wbnetrc.py): $NETRC, then an existing ~/.netrc or ~/_netrc.
    if os.environ.get("NETRC"):
        return os.path.expanduser(os.environ["NETRC"])
    for name in ("~/.netrc", "~/_netrc"):
        if os.path.exists(os.path.expanduser(name)):
            return os.path.expanduser(name)
    return os.path.expanduser("~/.netrc")


def _saved_base_url() -> Optional[str]:
    """The server `wandb login --host` saved in wandb's global settings file, if any."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(os.path.join(os.path.expanduser(config_dir), "settings"))
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    return parser.get("default", "base_url", fallback=None)


def wandb_credentials() -> Optional[str]:
    """Where wandb would find credentials, said without asking the server (None: nowhere). Mirrors
    wandb's lookup (0.31, wandb/sdk/lib/wbauth): WANDB_API_KEY or WANDB_IDENTITY_TOKEN_FILE, then the
    netrc entry for the server's host. Lenient on purpose: the host may be WANDB_BASE_URL's, the one
    `wandb login --host` saved, or api.wandb.ai, since a key missed here refuses a run under
    WANDB_MODE=online, while one found here that wandb rejects only means logging offline."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(name):
            return name
    path = _netrc_path()
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return None
    for url in (os.environ.get("WANDB_BASE_URL"), _saved_base_url(), WANDB_DEFAULT_URL):
        host = urlsplit(url).netloc if url else ""
        creds = entries.authenticators(host) if host else None
        if creds and creds[2]:
            return f"{path} ({host})"
    return None


def check_wandb_credentials() -> None:
    """WANDB_MODE=online is the user insisting on the server: without a key wandb.init would fail
    (or prompt) only after the data is loaded, so say it now, with no network call."""
    if wandb_mode() == "online" and wandb_credentials() is None:
        raise ConfigError("log.report_to has `wandb` and WANDB_MODE=online, but no W&B API key was found: set "
                          "WANDB_API_KEY or run `wandb login` (or set WANDB_MODE=offline and `wandb sync` later)")


def _wandb_settings(wandb: Any, **values: float) -> Any:
    """wandb.Settings with those of `values` this wandb knows (finish_timeout is newer than our floor)."""
    fields = getattr(wandb.Settings, "model_fields", None)  # pydantic settings (wandb >= 0.19)
    known = set(fields) if fields is not None else {"init_timeout"}
    return wandb.Settings(**{key: value for key, value in values.items() if key in known})


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optim.lr": 0.2, ...}; TensorBoard's hparams take scalars and strings only."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class MetricsFile:
    """`{output_dir}/metrics.jsonl`: one JSON object per event. Appended locally; on object storage,
    which cannot append, the whole (small) file is rewritten at each flush."""

    def __init__(self, output_dir: str, resume_step: Optional[int], log: Any = print):
        self.url = f"{output_dir.rstrip('/')}/metrics.jsonl"
        self.storage, self.log = Storage(output_dir), log
        self.lines: list[str] = []
        if resume_step is not None:
            try:
                text = self.storage.read("metrics.jsonl").decode()
            except FileNotFoundError:
                text = ""
            self.lines = [line for line in text.splitlines()
                          if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.storage.makedirs("")
        self.storage.write("metrics.jsonl", "".join(line + "\n" for line in self.lines).encode())
        self._failing = False
        self._local = open(self.storage.path("metrics.jsonl"), "a") if self.storage.local else None

    def _rewrite(self) -> None:
        """Object stores cannot append: the whole (small) file again. An outage costs nothing but a
        line: the next flush writes everything, and the file is never needed to resume."""
        try:
            self.storage.write("metrics.jsonl", "".join(line + "\n" for line in self.lines).encode())
        except StorageError as e:
            if not self._failing:
                self.log(f"could not write {self.url} ({e}); it is written again at the next flush")
            self._failing = True
            return
        self._failing = False

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(finite_or_none(record), allow_nan=False)  # strict JSON: a NaN metric is null
        self.lines.append(line)
        if self._local:
            self._local.write(line + "\n")
            self._local.flush()

    def flush(self) -> None:
        if self._local is None:
            self._rewrite()

    def close(self) -> None:
        self.flush()
        if self._local:
            self._local.close()


class RunLog:
    """Main process only: metrics file + trackers. Other ranks get a RunLog that does nothing.

    Trackers are Accelerate's classes, but started, fed and finished here one by one, not through
    `accelerator.init_trackers` / `log` / `end_training`, which stop at the first one that raises."""

    def __init__(self, accelerator: Any, cfg: Config, run_id: Optional[str], resume_step: Optional[int],
                 dataset_size: int = 0):
        self.accelerator = accelerator
        self.say = accelerator.print
        # Every record says where in training it is: epoch and samples follow from the step.
        self.global_batch, self.dataset_size = cfg.train.global_batch_size, dataset_size
        self.active = accelerator.is_main_process
        self.run_id = run_id
        self.trackers: list[Any] = []
        self._dropped: list[Any] = []
        if not self.active:
            return
        self.metrics = MetricsFile(cfg.train.output_dir, resume_step, accelerator.print)
        if not cfg.log.report_to:
            return
        staging = local_staging_dir(cfg.train.output_dir)
        os.makedirs(staging, exist_ok=True)
        config = flatten(to_dict(cfg))
        for name in cfg.log.report_to:
            tracker = (self._start_wandb(cfg, staging, config) if name == "wandb"
                       else self._start_other(name, cfg.log.project, staging, config))
            if tracker is not None:
                self.trackers.append(tracker)

    @staticmethod
    def _start(kind: str, project: str, config: dict[str, Any], staging: str, /, **kwargs: Any) -> Any:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[kind]
        tracker = cls(project, staging, **kwargs) if cls.requires_logging_directory else cls(project, **kwargs)
        if hasattr(tracker, "start"):  # Accelerate >= 1.5 starts a tracker here, older ones in __init__
            tracker.start()
        tracker.store_init_configuration(config)
        return tracker

    def _start_other(self, name: str, project: str, staging: str, config: dict[str, Any]) -> Any:
        try:
            return self._start(name, project, config, staging)
        except Exception as e:  # noqa: BLE001 - a tracker raises what its library raises; none may stop training
            self.say(f"warning: {name} dropped: it could not start ({first_line(e, named=True)}); "
                     "training goes on")
            return None

    def _start_wandb(self, cfg: Config, staging: str, config: dict[str, Any]) -> Any:
        """The W&B run, online if it can be within the timeout, else offline under the same id (so
        `wandb sync` uploads one run, and a resume continues it), else none; one warning either way."""
        import wandb

        bound = tracker_timeout_s(cfg)
        # The viewer query behind wandb's "logged in as" line is not bounded by init_timeout (offline,
        # it held the start 10 s more); it is only for display: the server names the run's entity.
        os.environ.setdefault("WANDB__DISABLE_VIEWER", "true")
        self.run_id = self.run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        kwargs = {"id": self.run_id, "resume": "allow", "dir": staging,
                  "name": cfg.log.run_name or os.path.basename(cfg.train.output_dir.rstrip("/")),
                  "settings": _wandb_settings(wandb, init_timeout=_env_seconds("WANDB_INIT_TIMEOUT", bound),
                                              finish_timeout=_env_seconds("WANDB_FINISH_TIMEOUT", bound))}
        mode = wandb_mode()
        if mode is None and wandb_credentials() is None:
            # WANDB_MODE unset means wandb's default (online), not a user's demand: no key then is
            # someone trying the recipe, who expects training, and a hint, not an error or a prompt.
            why = "no API key (WANDB_API_KEY or `wandb login`)"
        else:
            try:
                return self._start("wandb", cfg.log.project, config, staging, **kwargs)
            except Exception as e:  # noqa: BLE001 - wandb raises CommError, UsageError, TimeoutError, OSError...
                why = (f"could not start online ({first_line(e, named=True)}; "
                       f"init_timeout {kwargs['settings'].init_timeout:g} s)")
                _abandon_wandb(wandb)  # the failed run holds its id in wandb's service until torn down
                if mode in ("offline", "disabled"):  # nothing else to fall back to
                    self.say(f"warning: wandb dropped: it could not start ({first_line(e, named=True)}); "
                             "training goes on")
                    return None
        try:
            tracker = self._start("wandb", cfg.log.project, config, staging, mode="offline", **kwargs)
        except Exception as e:  # noqa: BLE001 - as above: the run goes on without W&B
            _abandon_wandb(wandb)
            self.say(f"warning: wandb dropped: {why}, and not even offline ({first_line(e, named=True)}); "
                     "training goes on")
            return None
        run_dir = os.path.dirname(tracker.run.dir.rstrip("/"))  # .../wandb/offline-run-<time>-<id>/files
        self.say(f"warning: W&B: {why}; logging offline to run {self.run_id}: upload later with `wandb sync {run_dir}`")
        return tracker

    def _drop(self, tracker: Any, error: BaseException) -> None:
        self.trackers.remove(tracker)
        self._dropped.append(tracker)
        self.say(f"warning: {tracker.name} dropped: logging to it failed ({first_line(error, named=True)}); "
                 "training goes on, metrics.jsonl has every record")

    def position(self, step: int) -> dict[str, Any]:
        samples = step * self.global_batch
        return {"step": step, "epoch": round(samples / self.dataset_size, 4) if self.dataset_size else 0.0,
                "samples": samples}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        self.metrics.write({**self.position(step), **metrics})
        if not metrics:
            return
        for tracker in list(self.trackers):  # a copy: _drop removes from the list
            try:
                tracker.log(metrics, step=step)
            except Exception as e:  # noqa: BLE001 - a dashboard's failure, whatever its type, must not stop training
                self._drop(tracker, e)

    def event(self, name: str, step: int, **details: Any) -> None:
        """Resume and preemption marks, for the report's picture; not sent to the trackers."""
        if self.active:
            self.metrics.write({**self.position(step), "event": name, **details})
            self.metrics.flush()

    def flush(self) -> None:
        if self.active:
            self.metrics.flush()

    def finish(self, preempted: bool) -> None:
        """On every rank: Accelerate's end_training also tears down the process group. W&B's final
        upload waits at most `log.tracker_timeout_s` (finish_timeout); the rest is left for `wandb sync`."""
        if self.active:
            working, dropped = self.trackers, self._dropped
            self.trackers, self._dropped = [], []  # closed once, even if finish is called again
            for tracker in working + dropped:
                try:
                    if preempted and tracker.name == "wandb" and tracker in working:
                        run = tracker.tracker
                        if hasattr(run, "mark_preempting"):
                            run.mark_preempting()
                    tracker.finish()
                except Exception as e:  # noqa: BLE001 - the run is over: a tracker's close must not change its code
                    if tracker in working:  # a dropped one was already reported
                        self.say(f"warning: {tracker.name} could not close cleanly ({first_line(e, named=True)})")
            self.metrics.close()
        self.accelerator.end_training()


def _abandon_wandb(wandb: Any) -> None:
    """Free what a failed start left in wandb's service (the run id, above all), so that the offline
    retry can use the same id."""
    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - best effort: the retry reports what still fails
        pass
