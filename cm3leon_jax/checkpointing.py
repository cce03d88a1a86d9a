"""Orbax checkpoints of the train state and the data iterator, plus preemption handling.

A checkpoint holds `state` (step, params, optimizer state; restored straight into the sharded
layout) and `data` (each process's iterator position as JSON, through grain's orbax handler), so a
resumed run continues with exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import re
import signal
import threading

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from cm3leon_jax import workdir_io


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")  # grain's orbax handler: one file per process


class _StateSnapshot:
    """The iterator's state frozen at save time, whenever orbax's handler gets to write it."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


class CheckpointManager:
    def __init__(self, workdir: str, *, save_every_steps: int, keep: int, async_save: bool = True):
        if int(keep) < 1:   # orbax would delete every checkpoint, the last one too: a rerun starts over
            raise ValueError(f"keep_checkpoints={keep} must be >= 1")
        if int(save_every_steps) < 1:   # was taken as 1: a checkpoint every step, where 0 means "off" elsewhere
            raise ValueError(f"checkpoint_every_steps={save_every_steps} must be >= 1 (a run also saves at its last "
                             "step and when preempted)")
        self.directory = workdir_io.join(workdir_io.resolve(workdir), "checkpoints")
        self._save_every = int(save_every_steps)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=int(save_every_steps), max_to_keep=int(keep),
            enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self._last_saved_step = self._manager.latest_step()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Async for the arrays; the data position is captured now, before training moves on.
        Saving a step twice (an interval save, then the final or preemption save) is a no-op."""
        if step == self._last_saved_step:
            return False
        # the interval decided here: orbax's should_save also says yes at every step of a workdir that has
        # no checkpoint yet (its initial-save policy), which wrote an unasked checkpoint at step 1
        if not (force or step % self._save_every == 0):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(_StateSnapshot(data_iterator.get_state())))
        saved = self._manager.save(step, args=args, force=force)
        if saved:
            self._last_saved_step = step
        return saved

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores into `abstract_state`'s shardings (ShapeDtypeStructs carrying NamedShardings), so
        the mesh may differ from the one that saved. A data position saved by another process count
        is redistributed (`saved_data_states`, the iterator's `set_state_from_processes`)."""
        try:
            return self._restore(step, abstract_state, data_iterator)
        except ValueError as e:
            if not any(m in str(e) for m in ("tree structures do not match", "is not compatible with the stored shape")):
                raise
            raise ValueError(f"the checkpoint of step {step} in {self.directory} holds a state of another shape than "
                             "this run's: the model or the optimizer changed since it was saved (for instance "
                             "optimizer.skip_nonfinite turned on or off, which adds or drops the non-finite guard's "
                             "counters, or model.lora_rank / lora_targets changed, which reshapes the adapters). "
                             f"Resume with the saved run's config.json settings. Orbax: {e}") from None

    def _restore(self, step: int, abstract_state, data_iterator):
        check_step_holds_state(self._manager, step)
        if not (self._manager.directory / str(step) / "data").exists():
            # parameters only (export / import_hf, or a copy without data/): orbax's KeyError named no directory
            raise ValueError(f"{self.directory}/{step} holds no data position (a parameters-only checkpoint: an "
                             "exported or imported model, or a copy without its data/ folder), so training cannot "
                             "resume from it: train in a new workdir with config.init_from set to this one")
        other_states = self.saved_data_states(step)
        if other_states is None:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=grain.checkpoint.CheckpointRestore(data_iterator))
            return self._manager.restore(step, args=args)["state"]
        if not hasattr(data_iterator, "set_state_from_processes"):
            raise ValueError(f"step {step} was saved by {len(other_states)} processes and this run has "
                             f"{jax.process_count()}; {type(data_iterator).__name__} resumes only with the process "
                             "count it was saved with")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        data_iterator.set_state_from_processes(other_states)
        logging.info("step %d: data positions saved by %d processes, resumed on %d", step, len(other_states),
                     jax.process_count())
        return restored["state"]

    def saved_data_states(self, step: int) -> list[bytes] | None:
        """None when this process's own data file is there (or no data was saved: `_restore` refuses
        that first); otherwise every saving process's state, in process order."""
        directory = epath.Path(self.directory) / str(step) / "data"
        own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        names = [p.name for p in directory.glob("process_*-of-*.json")] if directory.exists() else []
        if not names or own in names:
            return None
        counts = {int(m.group(2)) for m in map(_DATA_FILE.fullmatch, names) if m}
        if len(counts) != 1:
            raise ValueError(f"{directory} holds data files of several process counts: {sorted(names)}")
        count = counts.pop()
        expected = [f"process_{i}-of-{count}.json" for i in range(count)]
        missing = sorted(set(expected) - set(names))
        if missing:
            raise ValueError(f"{directory} lacks {missing}: the data position of step {step} is incomplete")
        return [(directory / name).read_bytes() for name in expected]

    def save_or_stop(self, step: int, state, data_iterator, preemption: "PreemptionWatcher", logger) -> bool:
        """End of a train step: a checkpoint when one is due (the logger flushed with it, so a resumed
        run never lacks a record before its checkpoint); on a preemption notice, one now and True:
        the loop must stop."""
        if self.save(step, state, data_iterator):
            logger.flush()
        if preemption.should_stop(step):
            self.save(step, state, data_iterator, force=True)
            logging.warning("stopped for preemption at step %d after saving", step)
            return True
        return False

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionWatcher:
    """Tells the training loop, at the same step on every process, that it should save and stop.

    Single process: a SIGTERM handler sets a flag. Several processes: JAX's distributed runtime
    already catches SIGTERM, and `reached_preemption_sync_point` makes all processes agree on the
    step, so no process exits while the others wait in a collective.
    """

    _NOT_INSTALLED = object()

    def __init__(self):
        self._event = threading.Event()
        self._stopped = False
        self._multiprocess = jax.process_count() > 1
        self._previous = self._NOT_INSTALLED
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then exiting")
        self._event.set()

    def should_stop(self, step: int) -> bool:
        if self._multiprocess:
            from jax.experimental import multihost_utils
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service not running (e.g. distributed runtime without it)
                return False
        self._stopped = self._event.is_set()
        return self._stopped

    def close(self) -> None:
        """Gives SIGTERM back to the handler this one replaced, so a process that goes on after
        training (e2e's later stages) is still stopped by it; a SIGTERM that came too late for the
        loop to act on (after its last step) is passed on to that handler."""
        if self._previous is self._NOT_INSTALLED:
            return
        previous = signal.SIG_DFL if self._previous is None else self._previous
        self._previous = self._NOT_INSTALLED
        signal.signal(signal.SIGTERM, previous)
        if self._event.is_set() and not self._stopped:
            signal.raise_signal(signal.SIGTERM)


def _read_only_manager(workdir: str):
    directory = workdir_io.join(workdir_io.resolve(workdir), "checkpoints")
    return ocp.CheckpointManager(directory, item_names=("state",), item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                 options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                                      save_interval_steps=0)), directory


def _named_leaves(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _check_saved_params(manager, step: int, directory: str, abstract_params) -> None:
    """A partial restore fills parameters the checkpoint lacks with the ShapeDtypeStructs asked for
    (a crash far away, at the first use) and drops those it has beyond them (a tied head restored
    from an untied checkpoint: wrong outputs, silently): either is a ValueError naming them."""
    try:
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)["params"]
    except (KeyError, TypeError, ValueError, FileNotFoundError):   # no metadata to compare with: orbax decides
        return
    saved_leaves, our_leaves = _named_leaves(saved), _named_leaves(abstract_params)
    theirs, ours = set(saved_leaves), set(our_leaves)
    if theirs != ours:
        missing, extra = sorted(ours - theirs), sorted(theirs - ours)
        raise ValueError(
            f"the checkpoint of step {step} in {directory} holds other parameters than the model asked for: "
            + "; ".join(f"{what} {names[:6]}" + (f" and {len(names) - 6} more" if len(names) > 6 else "")
                        for what, names in (("missing", missing), ("not in the model", extra)) if names)
            + ". The model's config (config.json, or a default of this version) differs from the one that saved it")
    shapes = {name: tuple(x.shape) for name, x in saved_leaves.items() if getattr(x, "shape", None) is not None}
    wrong = [f"{name} {shapes[name]} (the model: {tuple(x.shape)})" for name, x in sorted(our_leaves.items())
             if name in shapes and tuple(x.shape) != shapes[name]]
    if wrong:   # orbax's own error named no parameter and advised padding/truncating it (strict=False)
        raise ValueError(f"the checkpoint of step {step} in {directory} holds parameters of other shapes than the model "
                         f"asked for: {'; '.join(wrong[:6])}" + (f" and {len(wrong) - 6} more" if len(wrong) > 6 else "")
                         + ". The model's config (config.json, or a default of this version) differs from the one "
                         "that saved it")


def check_step_holds_state(manager, step: int) -> None:
    """orbax takes any directory named by a number for a checkpoint: an empty `checkpoints/N` (a copy
    cut short, a hand-made folder) was the latest step, and restoring it ended in `KeyError: 'Item
    "data" was not found'`. Said here, naming what to delete; never silently skipped, since falling
    back to an older step would quietly retrain what the missing one held."""
    directory = manager.directory   # where orbax reads (its own path object)
    if not (directory / str(step) / "state").exists():
        earlier = sorted(int(s) for s in manager.all_steps() if int(s) < step)
        raise ValueError(f"{directory}/{step} holds no saved state (an empty or partly copied checkpoint); delete "
                         "it to resume from " + (f"step {earlier[-1]}" if earlier else "scratch"))


def saved_steps(workdir: str) -> list[int]:
    """The checkpoint steps a workdir holds, in order."""
    manager, _ = _read_only_manager(workdir)
    steps = sorted(int(s) for s in manager.all_steps())
    manager.close()
    return steps


def restore_params(workdir: str, abstract_params, step: int | None = None):
    """Parameters only, straight into `abstract_params`' shardings: the optimizer state is never
    read (generation, evaluation, export and fine-tuning from a pretrained run)."""
    manager, directory = _read_only_manager(workdir)
    step = manager.latest_step() if step is None else int(step)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; it holds steps "
                                f"{sorted(manager.all_steps())}")
    check_step_holds_state(manager, step)
    _check_saved_params(manager, step, directory, abstract_params)
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                           partial_restore=True))
    params = manager.restore(step, args=args)["state"]["params"]
    manager.close()
    return params, step
