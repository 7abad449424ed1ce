"""Multi-stage pipelines: engines chained stage by stage, running concurrently
on a stream of micro-batches (stage i works on batch n+1 while stage i+1 works
on batch n), connected by bounded queues.

The class is ``StagePipeline``: a chain of engines.  (A ``Pipeline`` in
dsstream is one session's task work, dsstream.pipelines.base.)  ``Pipeline``
stays as its name in the engine's seed API.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = ["StagePipeline", "Pipeline"]

Outputs = dict[str, np.ndarray]
_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class StagePipeline:
    """``StagePipeline([encoder, decoder], device_map=["cpu", "cpu"], memory_efficient=True)``.

    Each stage's outputs feed the next stage's inputs: by name where the names
    match, else in order.  ``memory_efficient=True`` drops each intermediate as
    soon as the next stage has taken it; ``False`` keeps every stage's outputs
    in the results (``{"stage0.name": ...}``) for inspection.  ``queue_size``
    bounds the micro-batches waiting between two stages.
    """

    def __init__(
        self,
        stages: Sequence[Any],
        device_map: Sequence[str] | None = None,
        memory_efficient: bool = True,
        queue_size: int = 2,
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        if device_map is not None:
            if len(device_map) != len(stages):
                raise ValueError(
                    f"device_map has {len(device_map)} entries for {len(stages)} stages"
                )
            for i, (stage, device) in enumerate(zip(stages, device_map)):
                if getattr(stage, "device", device) != device:
                    raise ValueError(
                        f"stage {i} runs on {stage.device!r} but device_map says {device!r}"
                    )
        self.stages = list(stages)
        self.memory_efficient = memory_efficient
        self.queue_size = queue_size

    def _feed(self, index: int, previous: Mapping[str, Any]) -> dict[str, Any]:
        names = self.stages[index].input_names
        if set(names) <= set(previous):
            return {n: previous[n] for n in names}
        values = list(previous.values())
        if len(values) < len(names):
            raise ValueError(
                f"stage {index} needs inputs {names} but stage {index - 1} gives {list(previous)}"
            )
        return dict(zip(names, values))

    def _step(self, index: int, item: Mapping[str, Any]) -> Outputs:
        return self.stages[index].infer(self._feed(index, item) if index else item)

    def infer(self, inputs: Mapping[str, Any]) -> Outputs:
        """One request through every stage, in this thread."""
        return next(self.run([inputs]))

    def run(self, batches: Iterable[Mapping[str, Any]]) -> Iterator[Outputs]:
        """Stream micro-batches through the stages concurrently; results in order."""
        queues: list[queue.Queue[Any]] = [
            queue.Queue(self.queue_size) for _ in range(len(self.stages) + 1)
        ]
        threads = [
            threading.Thread(target=self._worker, args=(i, queues[i], queues[i + 1]), daemon=True)
            for i in range(len(self.stages))
        ]
        for t in threads:
            t.start()
        feeder = threading.Thread(target=self._source, args=(batches, queues[0]), daemon=True)
        feeder.start()
        try:
            while True:
                item = queues[-1].get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item[1]
        finally:
            feeder.join(timeout=1)

    def _source(self, batches: Iterable[Mapping[str, Any]], out: queue.Queue[Any]) -> None:
        try:
            for batch in batches:
                out.put((dict(batch), {}))
        except BaseException as exc:  # a failing input iterator ends the run with its error
            out.put(_Failure(exc))
        out.put(_DONE)

    def _worker(self, index: int, inbox: queue.Queue[Any], outbox: queue.Queue[Any]) -> None:
        while True:
            item = inbox.get()
            if item is _DONE or isinstance(item, _Failure):
                outbox.put(item)
                if item is _DONE:
                    return
                continue
            current, kept = item
            try:
                result = self._step(index, current)
            except BaseException as exc:
                outbox.put(_Failure(exc))
                continue
            if not self.memory_efficient:
                kept = {**kept, **{f"stage{index}.{k}": v for k, v in result.items()}}
            del current, item  # the intermediate is free once this stage has used it
            if index < len(self.stages) - 1:
                outbox.put((result, kept))
            else:
                outbox.put((None, result if self.memory_efficient else {**kept, **result}))


Pipeline = StagePipeline  # the seed API's name
