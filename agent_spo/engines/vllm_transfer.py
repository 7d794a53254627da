"""The gloo path into a vLLM replica: a weight-transfer backend for vLLM's own control path.

vLLM (0.32) drives weight updates through a pluggable *weight-transfer engine* in each
worker, reached over HTTP: ``/init_weight_transfer_engine`` (join the trainer),
``/start_weight_update``, ``/update_weights`` (receive), ``/finish_weight_update``
(with the new ``weight_version``). Its built-in backends are ``nccl`` and ``ipc``, both
CUDA-only. This module adds ``agent_spo_gloo`` (:data:`BACKEND`): the same control path
over the two-process gloo group of :mod:`agent_spo.engines.transfer`, so a vLLM-CPU
replica takes the very updates a transformers replica takes, in the same stream.

A replica uses it when started with ``--weight-transfer-config '{"backend":
"agent_spo_gloo"}'`` (:func:`agent_spo.engines.vllm.server_command` adds it). vLLM
builds the engine while it loads the model; the backend is registered when the worker
imports :mod:`agent_spo.engines.vllm` for its worker extension, which happens first.

Weights arrive one bucket at a time and go straight into ``model.load_weights`` under
vLLM's layerwise reload (a layer is processed once all its tensors are in), so the
replica never holds a second copy of the model. If the trainer's stream breaks
part-way, the reload is finalised at once: layers that got nothing keep their old
tensors, none is left on the meta device, and the trainer marks the replica's version
-1 so it is not admitted again until a whole update reaches it. A sync that ends
between ``/start_weight_update`` and ``/finish_weight_update`` for any other reason
(cancelled, timed out) gets a ``/finish_weight_update`` from the trainer first, which
finalises the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

BACKEND = "agent_spo_gloo"


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """Where the trainer's rendezvous listens (:class:`~agent_spo.engines.transfer.GlooSender`)."""

    host: str
    port: int
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """The version the trainer is about to send (checked against every header)."""

    version: int


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.link: Any = None
        self._reloading = False

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        """Join the trainer's group (blocks until it has joined too, or its timeout);
        a new link replaces an old one."""
        from agent_spo.engines.transfer import GlooReceiver

        self.shutdown()
        self.link = GlooReceiver(init_info.host, init_info.port, timeout_s=init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        self._reloading = True

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class synchronises ``torch.accelerator``, which a CPU worker has not
        try:
            self.receive_weights(self.parse_update_info(update_info))
        except BaseException:
            self.shutdown()  # out of step with the trainer: it links again on rejoin
            self._finalize()  # nothing stays on the meta device
            raise
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        from agent_spo.engines.transfer import IncomingUpdate

        if self.link is None:
            raise RuntimeError("no gloo link: POST /init_weight_transfer_engine first")
        hf = self.model_config.hf_text_config
        skip = {"lm_head.weight"} if getattr(hf, "tie_word_embeddings", False) else set()
        incoming = IncomingUpdate(self.link, int(update_info.version))
        # typed as the Module's attribute (Tensor | Module) where vLLM is installed
        load: Any = self.model.load_weights
        load((n, t) for n, t in incoming if n not in skip)

    def finish_weight_update(self) -> None:
        from agent_spo.engines.vllm import _refresh_tied_lm_head

        self._finalize()
        _refresh_tied_lm_head(self.model)

    def _finalize(self) -> None:
        if self._reloading:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            self._reloading = False
            finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
