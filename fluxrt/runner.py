"""The one runner interface every backend implements (ONNX Runtime, TensorRT, the torch reference).

A runner executes one component.  Its shape follows Polygraphy's: constructing it only records
what to load (the path was verified by whoever made the runner); ``activate()`` loads the
backend's session or engine; ``infer(feed) -> dict`` checks the feed against the component's
tensor spec before running; ``last_inference_time`` says how long the last call took.  The
runtime's loop (``fluxrt.runtime.loop``) runs over any mix of runners.  ``set_loras`` merges LoRA
updates into a runner's weights, where its backend can change them.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from typing import Mapping, Sequence

from fluxrt.components import ComponentSpec
from fluxrt.dtypes import Array
from fluxrt.errors import EngineError, FluxRTError, InvalidInputError
from fluxrt.lora import LoraFile


def backend_error(runner: "Runner", doing: str, e: BaseException) -> EngineError:
    """A backend library's own exception as an EngineError naming the stage, the backend and its message
    (on one line: the libraries' messages run over several)."""
    message = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, MemoryError):
        message = f"out of memory ({message})"
    return EngineError(f"{runner.name} ({runner.backend}): {doing} failed: {message}")


class Runner(ABC):
    """Runs one component.  ``precision`` is the graph's activation precision (fp32/fp16/bf16)."""

    backend: str = "abstract"
    device: str = "cpu"  # where infer() wants its inputs and leaves its outputs: "cpu" or "cuda"

    def __init__(self, spec: ComponentSpec, precision: str):
        self.spec = spec
        self.precision = precision
        self.last_inference_time: float | None = None
        self._active = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    def activate(self) -> "Runner":
        with self._lock:
            if not self._active:
                try:
                    self._activate()
                except FluxRTError:
                    raise
                except Exception as e:  # the backend library's own errors, out-of-memory included
                    raise backend_error(self, "loading", e) from e
                self._active = True
        return self

    def deactivate(self) -> None:
        with self._lock:
            if self._active:
                self._deactivate()
                self._active = False

    def input_dtype(self, name: str) -> str:
        return self.spec.input(name).resolved_dtype(self.precision)

    def check_feed(self, feed: Mapping[str, Array]) -> None:
        missing = [n for n in self.spec.input_names if n not in feed]
        extra = [n for n in feed if n not in self.spec.input_names]
        if missing or extra:
            raise InvalidInputError(
                f"{self.name} ({self.backend}): feed has inputs {sorted(feed)}, expected {self.spec.input_names}"
            )
        for t in self.spec.inputs:
            x = feed[t.name]
            want = self.input_dtype(t.name)
            bf16_bits = want == "bfloat16" and self.device == "cuda" and str(x.dtype) == "uint16"
            if str(x.dtype) != want and not bf16_bits:
                raise InvalidInputError(f"{self.name} ({self.backend}): input {t.name!r} has dtype {x.dtype}, "
                                        f"expected {want}")
            if len(x.shape) != len(t.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(t.shape, x.shape)
            ):
                raise InvalidInputError(f"{self.name} ({self.backend}): input {t.name!r} has shape "
                                        f"{tuple(x.shape)}, expected {t.shape}")

    def infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        if not self._active:
            raise EngineError(f"{self.name} ({self.backend}): runner used before activate()")
        self.check_feed(feed)
        start = time.perf_counter()
        try:
            out = self._infer(feed)
        except FluxRTError:
            raise
        except Exception as e:  # the backend library's own errors, out-of-memory included
            raise backend_error(self, "running", e) from e
        self.last_inference_time = time.perf_counter() - start
        return out

    def set_loras(self, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Compute with LoRA updates merged into the weights from the next ``infer`` on: each linear the
        ``(file, scale)`` pairs target uses ``W + Σ scale·m·(up @ down)``, added in the order given to W, the
        graph's or plan's own weight; an empty sequence gives the own weights back.  Backends that cannot
        change their weights refuse."""
        raise InvalidInputError(f"{self.name} ({self.backend}): the {self.backend} backend cannot take LoRA "
                                f"weights; run the export folder on ort-cpu or ort-cuda for LoRA")

    @abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        pass

    @abstractmethod
    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.precision}, {self.device})"
