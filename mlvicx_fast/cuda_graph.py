"""The whole training step (forward of both views, loss, backward, optimiser update) as one CUDA graph.

At batch 64 an eager MLVICX step is bound by its ~1000 kernel launches; replaying a captured
graph removes that cost. :class:`GraphedStep` captures on its first call, from the shapes of the
views it is given, and afterwards copies each new pair of views into static input buffers and
replays. Capturing needs a few warm-up steps (on a side stream, as CUDA requires); their effect on
the parameters, the normalisation buffers and the optimiser state is undone, so a run with a
graph takes exactly the steps a run without one takes.

What the step may do: no host synchronisation (no .item(), no data-dependent Python control flow),
no new parameters, a learning rate read from a device tensor (LARS accepts one), no dynamic loss
scale (so bf16 or fp32, not fp16).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch


class GraphedStep:
    """``values = step(x1, x2)`` through a CUDA graph; ``step_fn(x1, x2)`` must return a tensor."""

    def __init__(self, step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, warmup: int = 3):
        self.step_fn, self.model, self.optimizer, self.warmup = step_fn, model, optimizer, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def _snapshot(self) -> Dict:
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        opt = {id(p): {k: v.detach().clone() for k, v in s.items() if torch.is_tensor(v)}
               for p, s in self.optimizer.state.items()}
        return {"model": model, "opt": opt}

    @torch.no_grad()
    def _restore(self, snap: Dict) -> None:
        """Put the snapshot back in place: the captured graph keeps pointing at the same tensors."""
        for k, v in self.model.state_dict().items():
            v.copy_(snap["model"][k])
        for p, state in self.optimizer.state.items():
            saved = snap["opt"].get(id(p), {})
            for k, v in state.items():
                if torch.is_tensor(v):
                    v.copy_(saved[k]) if k in saved else v.zero_()
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def _capture(self, x1: torch.Tensor, x2: torch.Tensor) -> None:
        self.x1, self.x2 = x1.clone(), x2.clone()
        snap = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step_fn(self.x1, self.x2)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the FFCV loader's prefetch thread keeps copying batches to the GPU on its
        # own stream during the capture; in the default 'global' mode CUDA rejects such calls from
        # any other thread while a capture runs, which can fail the first step at random
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = self.step_fn(self.x1, self.x2)
        torch.cuda.synchronize()
        self._restore(snap)

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self._capture(x1, x2)
        if x1.shape != self.x1.shape or x2.shape != self.x2.shape:
            raise ValueError(f"GraphedStep: captured for views {tuple(self.x1.shape)}, got {tuple(x1.shape)} and "
                             f"{tuple(x2.shape)} (keep the batch size fixed: drop the last partial batch)")
        self.x1.copy_(x1)
        self.x2.copy_(x2)
        self.graph.replay()
        return self.out.clone()

