"""Driving policies and the model the way the runner does, for tests: the host hook before each
step, then the device-side step with the position as a tensor."""
import torch

from engine.graphs import Decoder
from engine.kv import build_policies


def attend_next(policy, q, k_new, v_new):
    """One decode step of a policy on its own: before_step(), then attend at the next position."""
    pos = torch.tensor([policy.length], device=policy.device)
    policy.before_step()
    return policy.attend(q, k_new, v_new, pos)


def decode_logits(model, tokens, spec, prompt_len, cuda_graphs=False, chunk=2048):
    """Prefill tokens[:, :prompt_len] under `spec` (in query chunks of `chunk`), then feed the rest
    one step at a time (teacher forcing) -> (logits (1 + steps, 1, vocab) on the CPU, the policies)."""
    device = model.head.device
    policies = build_policies(model.args, spec, tokens.shape[1], device, model.head.dtype)
    out = [model.prefill(tokens[:, :prompt_len].to(device), policies, chunk=chunk)]
    decoder = Decoder(model, policies, cuda_graphs)
    # a test asking for graphs on CUDA must get them, not a silent eager fallback
    assert decoder.graphed == (cuda_graphs and device.type == "cuda")
    out += [decoder.step(tokens[:, p].to(device), p).clone() for p in range(prompt_len, tokens.shape[1])]
    return torch.stack(out).cpu(), policies
