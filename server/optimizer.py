"""Server optimizers: how the aggregate update moves the global model each round.

The robust rule turns the clients' updates into one aggregate update ``delta_t`` (the direction the
clients moved, new minus old weights); a server optimizer turns that into the next global model:

- ``sgd`` with ``lr`` and ``momentum`` is FedAvgM (Hsu, Qi & Brown, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification", 2019):
  ``b_1 = delta_1``, ``b_t = momentum * b_{t-1} + delta_t``, ``x_{t+1} = x_t + lr * b_t``. With
  ``lr = 1`` and ``momentum = 0`` it is exactly ``x_t + delta_t``, plain FedAvg.
- ``adam`` and ``yogi`` are FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization",
  ICLR 2021, Algorithm 2): ``m_t = beta1 m_{t-1} + (1 - beta1) delta_t``; FedAdam
  ``v_t = beta2 v_{t-1} + (1 - beta2) delta_t^2``, FedYogi
  ``v_t = v_{t-1} - (1 - beta2) delta_t^2 sign(v_{t-1} - delta_t^2)``;
  ``x_{t+1} = x_t + lr * m_t / (sqrt(v_t) + tau)``, with ``m`` and ``v`` starting at 0.

How this maps to Flower 1.42 (``flwr.serverapp.strategy``): ``FedAvgM(server_learning_rate=lr,
server_momentum=momentum)`` is the ``sgd`` kind (Flower's pseudo-gradient is ``-delta``; the same
update). ``FedAdam``/``FedYogi(eta=lr, beta_1=beta1, beta_2=beta2, tau=tau)`` are ``adam``/``yogi``,
except that Flower's FedAdam multiplies ``eta`` by ``sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))`` in
round t (an Adam-style bias correction, shifted by one round, that the paper does not have):
``bias_correction=True`` does the same, with t the number of steps taken (the server round when
every round steps). Defaults follow Flower: ``beta1 = 0.9``, ``beta2 = 0.99``, ``tau = 1e-3``. Flower's
``eta`` default is 0.1; here ``lr`` defaults to 1.0 for every kind (1.0 is plain FedAvg for ``sgd``):
set it for ``adam``/``yogi`` (Reddi et al. tuned 10^-2.5 to 10^0 on their tasks).

The optimizer keeps its state in float64 on the global vector's device and returns the new global
in the global vector's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from server.stacking import all_finite

#: Optimizer kinds, as in run-config ``server-optimizer``.
KINDS = ("sgd", "adam", "yogi")


def _check_number(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    """``value`` as float if it lies in the interval, else a ValueError naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"server optimizer: {name} must be a number in {interval}, got {value!r}")
    return float(value)


class ServerOptimizer:
    """Applies the aggregate update to the global model (module notes: the update rules).

    Parameters
    ----------
    kind : str
        ``"sgd"`` (FedAvg / FedAvgM), ``"adam"`` (FedAdam) or ``"yogi"`` (FedYogi).
    lr : float
        Server learning rate (Flower's ``server_learning_rate`` for sgd, ``eta`` for adam/yogi).
    momentum : float
        Heavy-ball momentum in [0, 1), sgd only (adam/yogi have ``beta1``).
    beta1 : float
        First-moment decay in [0, 1) (adam/yogi).
    beta2 : float
        Second-moment decay in [0, 1) (adam/yogi).
    tau : float
        Adaptivity ``tau > 0`` added to ``sqrt(v)`` (adam/yogi).
    bias_correction : bool
        adam only: scale ``lr`` as Flower's FedAdam does (module notes).

    Raises
    ------
    ValueError
        An unknown kind, a parameter out of range, or a parameter the kind does not use set away
        from its default (momentum with adam/yogi, bias_correction with sgd/yogi).
    """

    def __init__(
        self,
        kind: str = "sgd",
        lr: float = 1.0,
        momentum: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"server optimizer: kind must be one of {list(KINDS)}, got {kind!r}")
        self.kind = kind
        self.lr = _check_number("lr", lr, 0.0, math.inf, True, True)
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0, False, True)
        self.beta1 = _check_number("beta1", beta1, 0.0, 1.0, False, True)
        self.beta2 = _check_number("beta2", beta2, 0.0, 1.0, False, True)
        self.tau = _check_number("tau", tau, 0.0, math.inf, True, True)
        if not isinstance(bias_correction, bool):
            raise ValueError(f"server optimizer: bias_correction must be a bool, got {bias_correction!r}")
        self.bias_correction = bias_correction
        if kind != "sgd" and self.momentum != 0.0:
            raise ValueError(f"server optimizer: momentum applies to kind 'sgd' only (use beta1 for {kind!r}), got {momentum!r}")
        if kind != "adam" and bias_correction:
            raise ValueError(f"server optimizer: bias_correction applies to kind 'adam' only, got kind {kind!r}")
        self.steps = 0
        self.momentum_buffer: Optional[Tensor] = None
        self.first_moment: Optional[Tensor] = None
        self.second_moment: Optional[Tensor] = None

    @property
    def is_plain(self) -> bool:
        """Whether ``step`` is exactly ``global + aggregate`` (sgd, lr 1, no momentum)."""
        return self.kind == "sgd" and self.lr == 1.0 and self.momentum == 0.0

    def step(self, global_vector: Tensor, aggregate_update: Tensor, statistics: Optional[Tensor] = None) -> Tensor:
        """The next global model from this round's aggregate update.

        Parameters
        ----------
        global_vector : Tensor
            ``(d,)`` floating: the current global model, flattened.
        aggregate_update : Tensor
            ``(d,)`` floating and finite, any device: the robust rule's output (new minus old).
        statistics : Tensor, optional
            ``(d,)`` bool: coordinates that are running statistics, not parameters (BatchNorm's
            ``running_mean`` and ``running_var``). They take the aggregate as it is: momentum or an
            adaptive step would move a variance past zero (a NaN model) and has no meaning for an
            average the clients measured. The optimizer's state stays zero there.

        Returns
        -------
        Tensor
            ``(d,)`` new global model, same dtype and device as ``global_vector``. The inputs are
            not modified.

        Raises
        ------
        ValueError
            On a shape mismatch, a non-floating input, a non-finite update, or a length different
            from the one the optimizer's state was built for.
        """
        for name, tensor in (("global_vector", global_vector), ("aggregate_update", aggregate_update)):
            if not isinstance(tensor, Tensor) or tensor.dim() != 1 or not tensor.is_floating_point():
                raise ValueError(f"server optimizer: {name} must be a 1-D floating tensor")
        if aggregate_update.shape != global_vector.shape:
            raise ValueError(
                f"server optimizer: aggregate_update has shape {tuple(aggregate_update.shape)}, "
                f"global_vector {tuple(global_vector.shape)}"
            )
        if not all_finite(aggregate_update):
            raise ValueError("server optimizer: aggregate_update contains NaN or Inf")
        state = next((t for t in (self.momentum_buffer, self.first_moment) if t is not None), None)
        if state is not None and state.shape != global_vector.shape:
            raise ValueError(f"server optimizer: state has {state.shape[0]} values, global_vector {global_vector.shape[0]}")
        device, dtype = global_vector.device, global_vector.dtype
        if self.is_plain:
            self.steps += 1
            return global_vector + aggregate_update.to(device=device, dtype=dtype)
        if statistics is None or not bool(statistics.any()):
            return self._step(global_vector, aggregate_update)
        if statistics.shape != global_vector.shape or statistics.dtype != torch.bool:
            raise ValueError(f"server optimizer: statistics must be a bool mask of shape {tuple(global_vector.shape)}")
        statistics = statistics.to(device)
        update = aggregate_update.to(device=device, dtype=dtype)
        new_global = self._step(global_vector, update.masked_fill(statistics, 0.0))
        new_global[statistics] = global_vector[statistics] + update[statistics]
        return new_global

    def _step(self, global_vector: Tensor, aggregate_update: Tensor) -> Tensor:
        """The optimizer's update rule on validated inputs (module notes)."""
        device, dtype = global_vector.device, global_vector.dtype
        # float64 state, updated in place (state_dict and load_state_dict copy, so no snapshot aliases it).
        delta = aggregate_update.to(device=device, dtype=torch.float64, copy=True)
        if self.kind == "sgd":
            direction = delta
            if self.momentum > 0.0:
                if self.momentum_buffer is None:
                    self.momentum_buffer = delta
                else:
                    self.momentum_buffer = self.momentum_buffer.to(device).mul_(self.momentum).add_(delta)
                direction = self.momentum_buffer
            self.steps += 1
            return global_vector.to(torch.float64, copy=True).add_(direction, alpha=self.lr).to(dtype)
        first = torch.zeros_like(delta) if self.first_moment is None else self.first_moment.to(device)
        second = torch.zeros_like(delta) if self.second_moment is None else self.second_moment.to(device)
        first.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        squared = delta.square_()
        if self.kind == "adam":
            second.mul_(self.beta2).add_(squared, alpha=1.0 - self.beta2)
        else:
            second.addcmul_(squared, torch.sign(second - squared), value=-(1.0 - self.beta2))
        self.first_moment, self.second_moment = first, second
        self.steps += 1
        rate = self.lr
        if self.bias_correction:
            t = self.steps + 1.0
            rate = self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        denominator = second.sqrt().add_(self.tau)
        return global_vector.to(torch.float64, copy=True).addcdiv_(first, denominator, value=rate).to(dtype)

    def state_dict(self) -> Dict[str, Any]:
        """Plain data for a checkpoint: the kind, the step count and copies of the buffers (or None)."""
        def copy(tensor: Optional[Tensor]) -> Optional[Tensor]:
            return None if tensor is None else tensor.detach().clone()

        return {
            "kind": self.kind,
            "steps": self.steps,
            "momentum_buffer": copy(self.momentum_buffer),
            "first_moment": copy(self.first_moment),
            "second_moment": copy(self.second_moment),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (buffers move to the global's device on the next step).

        Raises
        ------
        ValueError
            If the state belongs to another kind, or a buffer is not a 1-D floating tensor.
        """
        if state.get("kind") != self.kind:
            raise ValueError(f"server optimizer: state is for kind {state.get('kind')!r}, this optimizer is {self.kind!r}")
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"server optimizer: steps must be a non-negative int, got {steps!r}")
        buffers = {}
        for key in ("momentum_buffer", "first_moment", "second_moment"):
            tensor = state.get(key)
            if tensor is not None and (not isinstance(tensor, Tensor) or tensor.dim() != 1 or not tensor.is_floating_point()):
                raise ValueError(f"server optimizer: {key} must be a 1-D floating tensor or None")
            buffers[key] = None if tensor is None else tensor.detach().clone().to(torch.float64)
        self.steps = steps
        self.momentum_buffer = buffers["momentum_buffer"]
        self.first_moment = buffers["first_moment"]
        self.second_moment = buffers["second_moment"]

    def summary(self) -> str:
        """One line naming the optimizer and its parameters (for the server log and the report)."""
        if self.kind == "sgd":
            name = "FedAvg" if self.is_plain else "FedAvgM"
            return f"server optimizer: sgd ({name}), lr={self.lr:g}, momentum={self.momentum:g}"
        name = "FedAdam" if self.kind == "adam" else "FedYogi"
        extra = ", Flower's bias correction" if self.bias_correction else ""
        return (
            f"server optimizer: {self.kind} ({name}), lr={self.lr:g}, beta1={self.beta1:g}, "
            f"beta2={self.beta2:g}, tau={self.tau:g}{extra}"
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ServerOptimizer":
        """Build from run-config keys (absent keys take the constructor defaults):
        ``server-optimizer``, ``server-lr``, ``server-momentum``, ``server-beta1``,
        ``server-beta2``, ``server-tau``, ``server-bias-correction``."""
        keys = {
            "server-optimizer": "kind",
            "server-lr": "lr",
            "server-momentum": "momentum",
            "server-beta1": "beta1",
            "server-beta2": "beta2",
            "server-tau": "tau",
            "server-bias-correction": "bias_correction",
        }
        kwargs = {param: run_config[key] for key, param in keys.items() if key in run_config}
        if isinstance(kwargs.get("kind"), str):
            kwargs["kind"] = kwargs["kind"].strip().lower()
        for param in ("lr", "momentum", "beta1", "beta2", "tau"):
            if isinstance(kwargs.get(param), int) and not isinstance(kwargs[param], bool):
                kwargs[param] = float(kwargs[param])  # TOML writes 1 for 1.0
        return cls(**kwargs)
