"""Orbax checkpoints of the training state plus a small JSON record (step, data position, config
fingerprint), saved asynchronously every N steps to a local directory or gs://."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from sae.io import storage


class Checkpointer:
    """With several hosts every host makes one and calls save and restore alike: Orbax
    writes each host's shards and has the primary host write the metadata and the record."""

    def __init__(self, directory_uri: str, max_to_keep: int = 2, read_only: bool = False) -> None:
        self.directory_uri, self.max_to_keep = directory_uri, max_to_keep
        # read_only: another run's checkpoints (a warm start), which must stay as they are.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=not read_only,
        )
        self.manager = ocp.CheckpointManager(storage.orbax_path(directory_uri), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
            ),
        )

    def read_record(self, step: int) -> dict[str, Any]:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
        )
        return dict(restored.record)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state at `step`, placed with the shardings carried by `abstract_state`."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.record)

    def restore_subset(self, step: int, abstract_subset: Any) -> Any:
        """Only the parts of the saved state named by `abstract_subset` (a tree of dicts over
        the state's fields, each leaf a ShapeDtypeStruct with its sharding); the rest, such
        as an optimizer state of another shape, is not read."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subset)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract_subset, restore_args=restore_args, partial_restore=True
                )
            ),
        )
        return restored.state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
