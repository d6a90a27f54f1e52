"""Pseudo-gradient compression for the outer all-reduce only, with error feedback.

Each worker sends its (pseudo-gradient + carried error) in a low-precision form and keeps what the
rounding lost as the error to add next round, so nothing is dropped for good. Low-precision payloads are
exchanged with all_gather and averaged in fp32 locally: summing int8 (or bf16) inside the collective
would overflow or compound rounding, and gloo cannot reduce those dtypes anyway.

Bytes handed to the collective per sync, for P fp32 parameters in n tensors:
  none: 4P   bf16: 2P   int8: P + 4n (one fp32 scale per tensor)
"""

import torch

from nanochat import comm

KINDS = ("none", "bf16", "int8")


class Compressor:
    def __init__(self, kind, segment_sizes, device):
        assert kind in KINDS, f"unknown compression {kind!r}, expected one of {KINDS}"
        self.kind = kind
        self.segment_sizes = list(segment_sizes)  # numel of each tensor packed in the flat buffer
        self.device = device
        self.error = None  # error-feedback buffer (fp32, same layout as the flat pseudo-gradient)

    def all_reduce_mean(self, flat, group):
        """Mean of `flat` over the group, through the chosen compression. `flat` is fp32 and 1-D."""
        if self.kind == "none":
            return comm.all_reduce_mean(flat, group)
        if self.error is None:
            self.error = torch.zeros_like(flat)
        x = flat + self.error
        if self.kind == "bf16":
            q = x.to(torch.bfloat16)
            self.error = x - q.float()
            gathered = comm.all_gather(q, group)
            return torch.stack([g.float() for g in gathered]).mean(0)
        # int8 with one scale per tensor: q = round(x / s), s = absmax / 127
        segments = torch.split(x, self.segment_sizes)
        scales = torch.stack([s.abs().max() for s in segments]).clamp(min=1e-30) / 127.0
        scale_per_elem = torch.repeat_interleave(scales, torch.tensor(self.segment_sizes, device=x.device))
        q = torch.round(x / scale_per_elem).clamp(-127, 127).to(torch.int8)
        self.error = x - q.float() * scale_per_elem
        all_q = comm.all_gather(q, group)
        all_scales = comm.all_gather(scales, group)
        total = torch.zeros_like(flat)
        for qk, sk in zip(all_q, all_scales):
            total += qk.float() * torch.repeat_interleave(sk, torch.tensor(self.segment_sizes, device=x.device))
        return total / len(all_q)

    def state_dict(self):
        return {"kind": self.kind, "error": None if self.error is None else self.error.cpu()}

    def load_state_dict(self, state):
        assert state["kind"] == self.kind, f"checkpoint used {state['kind']} compression, this run {self.kind}"
        self.error = None if state["error"] is None else state["error"].to(self.device)
