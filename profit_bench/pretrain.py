"""A model converged on the old task, trained once and cached on disk for every trial that needs it.

Cache file: `<cache_dir>/<task>-<model>-s<seed>-<hash(PretrainConfig)>.pt` (a state_dict, loaded with
`weights_only=True`) plus a `.json` beside it with the config and the old-task metric it reached; the old-task
statistic a method declares (methods.OLD_TASK_STATS, by name: EWC's Fisher, MAS's importance), when asked for, as
`<stem>.<statistic>-n<N>.pt`. Every file is written to a temp file in the same folder (mode 0644, so a shared cache
works for everyone) and `os.replace`d, so a concurrent reader sees either nothing or the whole file; two processes
pretraining the same key at once both succeed and the last rename wins (the files are identical: pretraining is
seeded).

The cache heals itself: a file that fails to load, or whose metadata or tensors do not match its key and model, is
reported on stderr (path, reason), moved aside as `<name>.corrupt-<time>` and rebuilt. A cache folder that cannot
be written is reported before any pretraining starts.

Content hashes tie each file to its metadata: the checkpoint's `.json` holds the sha256 of the `.pt`'s bytes; an
old-task statistic has a `<stem>.<statistic>-n<N>.json` with its own sha256 and the checkpoint's; the before-metrics
file holds the checkpoint's sha256 and a sha256 of its numbers. A mismatch (another key's checkpoint copied over
this one, a file changed in place) is reported, moved aside and rebuilt like any corrupt file. Files written before
hashes existed (no `sha256` in the metadata) are rebuilt once, not re-hashed: a re-hash would bless whatever bytes
are there, which is exactly the failure hashes exist to catch, and pretraining is seeded, so the rebuild gives the
same weights.

Pretraining is the one training loop (`loop.train_steps`) on old-train, training backbone + old head.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from profit_bench import UserError, default_cache_dir, safe_name
from profit_bench.loop import LoopState, make_lr_factor, train_steps
from profit_bench.methods import OLD_TASK_STATS, get_method, make_optimizer
from profit_bench.tasks import TaskData, evaluate, get_task, task_spec

CACHE_VERSION = 2  # bump when pretraining code changes in a way the config hash cannot see (2: val carved out)
FILE_MODE = 0o644


@dataclass(frozen=True)
class PretrainConfig:
    optimizer: str = "adam"
    lr: float = 1e-4
    steps: int | None = None      # budget in optimizer steps (toy) ...
    epochs: int | None = None     # ... or in passes over old-train (images)
    batch_size: int = 128
    scheduler: str = "none"       # "none" | "step" | "cosine"
    step_size: int = 0            # StepLR period in steps
    gamma: float = 1.0            # StepLR decay
    weight_decay: float = 0.0
    limit: int | None = None      # the task's subsample size: different data, different weights
    dtype: str = "fp32"
    activation: str = "relu"      # the mlp's activation and LayerNorm placement (models.MLP_*): the model
    layernorm: str = "before_act"  # pretrained is a different one, so they are part of the key


def default_pretrain_config(task_name: str, **overrides) -> PretrainConfig:
    """The task's pretraining defaults (tasks.TASKS[...].pretrain) with the non-None `overrides` applied."""
    d = dict(task_spec(task_name).pretrain)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "steps" in overrides:
        d.pop("epochs", None)
    if "epochs" in overrides:
        d.pop("steps", None)
    d.update(overrides)
    return PretrainConfig(**d)


def pretrain_config_for(cfg) -> PretrainConfig:
    """The PretrainConfig a TrialConfig's trial loads (its pretrain_* overrides, limit, dtype and the mlp's
    activation / layernorm); `cfg` resolved by trial.resolve, which fills them in from its toy_variant."""
    return default_pretrain_config(cfg.task, steps=cfg.pretrain_steps, epochs=cfg.pretrain_epochs,
                                   lr=cfg.pretrain_lr, scheduler=cfg.pretrain_scheduler, limit=cfg.limit,
                                   dtype=cfg.dtype, batch_size=cfg.pretrain_batch_size,
                                   activation=cfg.activation, layernorm=cfg.layernorm)


def mlp_options(pcfg: PretrainConfig) -> dict:
    return dict(activation=pcfg.activation, layernorm=pcfg.layernorm)


# Fields added after checkpoints were cached: left out of the hash at their default, so those keys stay valid.
HASH_IF_CHANGED = {"activation": "relu", "layernorm": "before_act"}


def config_hash(pcfg: PretrainConfig) -> str:
    d = {k: v for k, v in asdict(pcfg).items() if HASH_IF_CHANGED.get(k, object()) != v}
    blob = json.dumps({"v": CACHE_VERSION, **d}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_key(task_name: str, model_name: str, seed: int, pcfg: PretrainConfig) -> str:
    """The file stem of one checkpoint; its .json, .pt and .<statistic>-n<N>.pt files all start with it."""
    safe_name(task_name, "task")
    safe_name(model_name, "model")
    return f"{task_name}-{model_name}-s{int(seed)}-{config_hash(pcfg)}"


def cache_path(task_name: str, model_name: str, seed: int, pcfg: PretrainConfig, cache_dir=None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{cache_key(task_name, model_name, seed, pcfg)}.pt"


def is_uri(cache_dir) -> bool:
    return cache_dir is not None and "://" in str(cache_dir)


@contextlib.contextmanager
def local_cache(cache_dir, key: str):
    """A local folder holding the cache files of `key`. A plain path is used as it is. A URI (s3://, gs://,
    hdfs://, file://: anything pyarrow.fs reads, as Ray Tune's storage) is mirrored through a local staging folder:
    the key's files are fetched first, and the files the body wrote or rewrote are uploaded afterwards, so every
    node of a cluster reads one cache without a shared file system."""
    if not is_uri(cache_dir):
        yield Path(cache_dir) if cache_dir is not None else default_cache_dir()
        return
    from pyarrow import fs
    try:
        remote, root = fs.FileSystem.from_uri(str(cache_dir))
        remote.create_dir(root, recursive=True)
        listing = remote.get_file_info(fs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError) as e:
        raise UserError(f"cache {cache_dir} cannot be reached ({e}); check the URI and its credentials") from None
    stage = default_cache_dir() / "staging" / hashlib.sha256(str(cache_dir).encode()).hexdigest()[:12]
    stage.mkdir(parents=True, exist_ok=True)
    remote_sizes = {i.base_name: i.size for i in listing if i.type == fs.FileType.File and i.base_name.startswith(key)}
    for name, size in remote_sizes.items():
        local = stage / name
        if not (local.is_file() and local.stat().st_size == size):
            fs.copy_files(f"{root}/{name}", str(local), source_filesystem=remote,
                          destination_filesystem=fs.LocalFileSystem())
    yield stage
    for local in stage.glob(f"{key}*"):
        if local.is_file() and remote_sizes.get(local.name) != local.stat().st_size:
            fs.copy_files(str(local), f"{root}/{local.name}", source_filesystem=fs.LocalFileSystem(),
                          destination_filesystem=remote)


def stat_path(ckpt: Path, stat: str, n_samples: int) -> Path:
    """Where the old-task statistic `stat` over `n_samples` examples of checkpoint `ckpt` is cached."""
    safe_name(stat, "old-task statistic")
    return Path(ckpt).with_name(f"{Path(ckpt).stem}.{stat}-n{int(n_samples)}.pt")


# ---------------------------------------------------------------------------------------------- files
def check_writable(folder: Path) -> None:
    """UserError unless files can be created in `folder` (created if missing); probed by writing, as root too."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"pretraining cache dir {folder} is not writable ({e.strerror}); pass a writable "
                        f"--cache-dir or set PROFIT_BENCH_CACHE") from None


def _atomic_write(path: Path, write) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600: others sharing the cache could not read it
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write to a file object names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(tensors: dict) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, buf)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _save_tensors(path: Path, tensors: dict) -> str:
    """Write `tensors`; return the sha256 of the file's bytes."""
    data = _tensor_bytes(tensors)
    _write_bytes(path, data)
    return sha256_bytes(data)


def _move_aside(paths: list[Path], reason: str) -> None:
    """Report a bad cache entry on stderr and rename its files to `.corrupt-<time>` (kept for inspection)."""
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    print(f"pretrain cache: {paths[0]}: {reason}; moved aside as *.corrupt-{stamp}, rebuilding", file=sys.stderr,
          flush=True)
    for p in paths:
        try:
            os.replace(p, p.with_name(f"{p.name}.corrupt-{stamp}"))
        except FileNotFoundError:  # absent, or another process moved it first
            pass


def _load_tensors(path: Path, like: dict[str, torch.Tensor], sha256: str | None = None
                  ) -> tuple[dict | None, str | None]:
    """(tensors, None) when `path` holds finite tensors with exactly the keys and shapes of `like` (and, given
    `sha256`, exactly the bytes its metadata names); (None, reason) otherwise."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    if sha256 is not None and sha256_bytes(data) != sha256:
        return None, (f"content hash {sha256_bytes(data)[:12]} does not match its metadata's {sha256[:12]} (another "
                      f"file copied over it, or changed in place)")
    try:
        state = torch.load(io.BytesIO(data), map_location=next(iter(like.values())).device, weights_only=True)
    except Exception as e:  # noqa: BLE001 — a damaged file can fail inside torch/pickle/zip in many ways
        return None, f"cannot be loaded ({type(e).__name__}: {str(e)[:200]})"
    if not isinstance(state, dict):
        return None, f"holds a {type(state).__name__}, not a state_dict"
    missing, extra = sorted(set(like) - set(state)), sorted(set(state) - set(like))
    if missing or extra:
        return None, f"keys do not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, v in like.items():
        if not torch.is_tensor(state[k]) or state[k].shape != v.shape:
            return None, f"{k} has shape {getattr(state[k], 'shape', None)}, the model needs {tuple(v.shape)}"
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            return None, f"{k} holds non-finite values"
    return state, None


def _load_checkpoint(path: Path, model, meta_want: dict) -> str | None:
    """Load `path` into `model`; the reason it is unusable, or None on success."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except FileNotFoundError:
        return "no .json metadata beside it"
    except (OSError, ValueError) as e:
        return f"unreadable .json metadata ({e})"
    for k, v in meta_want.items():
        if not isinstance(meta, dict) or meta.get(k) != v:
            return f"its metadata says {k}={meta.get(k) if isinstance(meta, dict) else None!r}, the key needs {v!r}"
    if not isinstance(meta.get("sha256"), str):
        return "no content hash (sha256) in its metadata: written before content hashes, rebuilt once"
    state, reason = _load_tensors(path, model.state_dict(), meta["sha256"])
    if reason is None:
        model.load_state_dict(state)
    return reason


# ---------------------------------------------------------------------------------------------- training
def pretrain(model, task: TaskData, pcfg: PretrainConfig, seed: int, progress=True) -> dict:
    """Train backbone + old head on old-train in place; return {old_val, old_val_loss, steps, wall_time_s,
    cpu_time_s (this process's CPU seconds: the compute a loaded shared machine's wall time hides)}."""
    torch.manual_seed(seed)
    model.requires_grad_(False)
    params = list(model.backbone.parameters()) + list(model.heads["old"].parameters())
    for p in params:
        p.requires_grad_(True)
    opt = make_optimizer(pcfg.optimizer, params, lr=pcfg.lr, weight_decay=pcfg.weight_decay)
    gen = torch.Generator(device=task.device).manual_seed(seed)
    batches_per_epoch = -(-len(task.old_train) // pcfg.batch_size)
    total = pcfg.steps if pcfg.steps is not None else pcfg.epochs * batches_per_epoch

    t0, cpu0 = time.perf_counter(), time.process_time()
    curve = []  # old-task validation metric per evaluation: shows whether pretraining reached a plateau
    # A live bar on a terminal (an image task pretrains for minutes between its per-epoch lines); off elsewhere.
    from tqdm import tqdm
    bar = tqdm(total=total, desc=f"pretrain {task.name}", unit="step", file=sys.stderr, leave=False,
               disable=None if progress else True, dynamic_ncols=True)

    def show(opt_, state, train_loss):
        curve.append(evaluate(model, task, "old_val")[0])
        if progress:
            tqdm.write(f"pretrain {task.name}: step {state.main_steps}/{total} train_loss {train_loss:.4g} old_val "
                       f"{curve[-1]:.4g} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        return True  # the loop itself stops on a non-finite loss

    # Image budgets: one evaluation per epoch; step budgets (toy): ten over the run.
    every = batches_per_epoch if pcfg.steps is None else max(total // 10, 1)
    state = LoopState()
    train_steps(model, opt, task.old_train, head="old", loss_fn=task.loss, batch_size=pcfg.batch_size,
                generator=gen, augment=task.augment, state=state,
                lr_factor=make_lr_factor(pcfg.scheduler, pcfg.step_size, pcfg.gamma, total),
                max_main_steps=pcfg.steps, max_epochs=pcfg.epochs, eval_every=every, on_eval=show,
                dtype=pcfg.dtype, on_main_step=lambda s: bar.update(1))
    bar.close()
    if state.diverged:
        raise UserError(f"pretraining {task.name} diverged (non-finite loss); lower the pretraining lr")
    model.requires_grad_(True)
    old_val, old_val_loss = evaluate(model, task, "old_val")
    return dict(old_val=old_val, old_val_loss=old_val_loss, steps=state.main_steps, old_val_curve=curve,
                wall_time_s=time.perf_counter() - t0, cpu_time_s=time.process_time() - cpu0)


def load_or_pretrain(task: TaskData, model_name: str, seed: int, pcfg: PretrainConfig, cache_dir=None,
                     progress=True, *, build=True):
    """The TaskModel for (task, model, seed), converged on the old task: from the cache, else trained and cached.

    A cached file that is unusable is moved aside and rebuilt. build=False: a missing (or unusable) checkpoint
    is a UserError naming the path instead (a sweep's trials, whose driver pretrained everything up front).
    """
    from profit_bench.models import build_model  # imports timm (seconds): keep it off the CLI's error paths

    path = cache_path(task.name, model_name, seed, pcfg, cache_dir)
    model = build_model(model_name, task, seed, mlp_options(pcfg)).to(task.device)
    meta_want = dict(task=task.name, model=model_name, seed=seed, hash=config_hash(pcfg))
    if path.is_file():
        reason = _load_checkpoint(path, model, meta_want)
        if reason is None:
            return model
        _move_aside([path, path.with_suffix(".json")], reason)
        model = build_model(model_name, task, seed, mlp_options(pcfg)).to(task.device)  # load never ran: fresh
    if not build:
        raise UserError(f"no pretrained checkpoint {path}; run the sweep's pretraining stage (or a trial with "
                        f"pretrain_if_missing=True) to build it")
    check_writable(path.parent)  # before, not after, the minutes of pretraining
    if progress:
        print(f"pretraining {task.name}/{model_name} seed {seed} on the old task (once; cached as {path})",
              file=sys.stderr, flush=True)
    info = pretrain(model, task, pcfg, seed, progress=progress)
    data = _tensor_bytes(model.state_dict())
    meta = dict(**meta_want, config=asdict(pcfg), metric=task.metric, sha256=sha256_bytes(data), **info)
    # JSON first: whoever sees the .pt can rely on the .json being there too.
    _write_json(path.with_suffix(".json"), meta)
    _write_bytes(path, data)
    return model


def checkpoint_sha256(ckpt: Path) -> str | None:
    """The content hash the checkpoint's metadata records (None: no readable metadata)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads(Path(ckpt).with_suffix(".json").read_text()).get("sha256")
    return None


def _numbers_sha256(values: dict) -> str:
    return sha256_bytes(json.dumps(values, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------- before metrics
BEFORE_SPLITS = ("old_val", "new_val", "old_test", "new_test")


def before_metrics(model, task: TaskData, ckpt: Path) -> dict:
    """The pretrained model's metric on every val/test split ({"old_val_before": ..}) and its new-task validation
    loss (`new_val_loss_before`, the anchor of protocol.trial_divergence_reason): a function of the checkpoint
    alone, so computed once (by the pretraining task) and kept beside it; every trial of that checkpoint reads it
    instead of evaluating four splits again. Stale (recomputed) when the checkpoint's content hash changed; a file
    whose numbers do not match its own hash is reported and moved aside."""
    path = ckpt.with_name(ckpt.stem + f".before-{task.device.type}.json")
    stamp = checkpoint_sha256(ckpt) if ckpt.is_file() else None
    saved = None
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(path.read_text())
    if isinstance(saved, dict) and stamp is not None and saved.get("checkpoint_sha256") == stamp:
        values = saved.get("values")
        if isinstance(values, dict) and saved.get("sha256") == _numbers_sha256(values):
            return values
        _move_aside([path], "its numbers do not match their content hash")
    evals = {s: evaluate(model, task, s) for s in BEFORE_SPLITS}  # (metric, loss) per split
    values = {**{f"{s}_before": evals[s][0] for s in BEFORE_SPLITS}, "new_val_loss_before": evals["new_val"][1]}
    with contextlib.suppress(OSError):  # a read-only cache: the trial still has its numbers
        _write_json(path, {"values": values, "sha256": _numbers_sha256(values), "checkpoint_sha256": stamp})
    return values


# ---------------------------------------------------------------------------------------------- old-task statistics
def old_stat(model, task: TaskData, ckpt: Path, stat: str, n_samples: int, seed: int, *, build=True) -> dict:
    """The old-task statistic `stat` (a key of methods.OLD_TASK_STATS: a method declares which one it needs) of the
    pretrained `model` (loaded from ckpt), cached as <stem>.<stat>-n<N>.pt with a .json holding its sha256 and the
    checkpoint's. Computed on old-train right after pretraining/loading, never from new-task data; a missing or
    unusable file is rebuilt from the checkpoint (build=False: a UserError instead)."""
    path = stat_path(ckpt, stat, n_samples)
    like = dict(model.named_parameters())
    ckpt_sha = checkpoint_sha256(ckpt)
    if path.is_file():
        values, reason = None, _stat_meta_reason(path, ckpt_sha)
        if reason is None:
            values, reason = _load_tensors(path, like, _stat_meta(path)["sha256"])
        if reason is None:
            return values
        _move_aside([path, path.with_suffix(".json")], reason)
    if not build:
        raise UserError(f"no old-task statistic {path}; build it with pretrain.ensure_pretrained(..., "
                        f"old_stats=[({stat!r}, {n_samples})])")
    check_writable(path.parent)
    gen = torch.Generator(device=task.device).manual_seed(seed)
    values = OLD_TASK_STATS[stat](model, task.old_train, head="old", n_samples=n_samples, generator=gen)
    data = _tensor_bytes(values)
    _write_json(path.with_suffix(".json"), {"sha256": sha256_bytes(data), "checkpoint_sha256": ckpt_sha,
                                            "stat": stat, "n_samples": n_samples})
    _write_bytes(path, data)
    return values


def _stat_meta(path: Path):
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.with_suffix(".json").read_text())
    return None


def _stat_meta_reason(path: Path, ckpt_sha: str | None) -> str | None:
    """Why the statistic at `path` cannot be trusted from its metadata alone (None: go on to its bytes)."""
    meta = _stat_meta(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        return "no content hash (sha256) in its .json metadata: written before content hashes, rebuilt once"
    if meta.get("checkpoint_sha256") != ckpt_sha:
        return "computed from another checkpoint (its checkpoint_sha256 differs from the checkpoint's)"
    return None


def ensure_pretrained(task_name: str, model_name: str, seed: int, pcfg: PretrainConfig, cache_dir, *,
                      data_dir=None, device="cpu", limit=None, old_stats=(), progress=True) -> Path | str:
    """Make sure the checkpoint (and each old-task statistic of `old_stats`, (name, n_samples) pairs) for this key
    is in the cache, building or healing it as needed; return the checkpoint's path. Plain arguments only, so a
    Ray task can run it."""
    task = get_task(task_name, data_dir=data_dir, device=device, seed=seed, limit=limit)
    key = cache_key(task_name, model_name, seed, pcfg)
    with local_cache(cache_dir, key) as local:
        model = load_or_pretrain(task, model_name, seed, pcfg, local, progress=progress)
        before_metrics(model, task, cache_path(task_name, model_name, seed, pcfg, local))
        for stat, n_samples in old_stats:
            old_stat(model, task, cache_path(task_name, model_name, seed, pcfg, local), stat, n_samples, seed)
    return f"{str(cache_dir).rstrip('/')}/{key}.pt" if is_uri(cache_dir) else cache_path(task_name, model_name,
                                                                                         seed, pcfg, cache_dir)


def old_stat_request_for(cfg) -> tuple[str, int] | None:
    """(statistic, old-train examples) the trial's method declared (methods.Method.old_task_stat), or None."""
    return get_method(cfg.method).old_task_request(cfg.method_args)
