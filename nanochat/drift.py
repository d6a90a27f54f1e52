"""How far apart two trained models are: in their weights and in what their layers compute.

relative_l2: ||theta_a - theta_b|| / ||theta_a|| over every parameter (one number per pair of checkpoints).
linear_cka:  linear centred kernel alignment (Kornblith et al. 2019) of two sets of hidden states of the same
             tokens; 1 = the same representation up to rotation and scale, 0 = unrelated. It compares layers of
             two models without matching their units, so two runs from different seeds can be compared.
layer_states: the residual stream after the embedding and after every block, for a fixed batch of tokens.
"""

import torch


@torch.no_grad()
def relative_l2(state_a, state_b):
    """||a - b|| / ||a|| over every floating-point tensor of two state dicts with the same keys and shapes."""
    if state_a.keys() != state_b.keys():
        raise ValueError(f"the models have different parameters: {sorted(state_a.keys() ^ state_b.keys())[:5]}")
    diff = norm = 0.0
    for key, a in state_a.items():
        if not torch.is_floating_point(a):
            continue
        b = state_b[key]
        if a.shape != b.shape:
            raise ValueError(f"{key}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ: not the same architecture")
        a, b = a.double(), b.double()
        diff += (a - b).pow(2).sum().item()
        norm += a.pow(2).sum().item()
    return (diff / norm) ** 0.5


@torch.no_grad()
def linear_cka(x, y):
    """Linear CKA of x (n, d1) and y (n, d2), rows = the same n examples: ||Y'X||^2 / (||X'X|| ||Y'Y||), centred."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    return (cross / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt())).item()


@torch.no_grad()
def layer_states(model, idx):
    """[embedding output, block 1 output, ..., block L output] of the model on tokens idx (B, T), each as a
    (B*T, width) float tensor on the CPU; read with forward hooks, so the model runs its own forward."""
    states = []

    def keep(_module, _inputs, output):
        states.append(output.detach().float().reshape(-1, output.shape[-1]).cpu())

    blocks = list(model.transformer.h)
    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: keep(m, None, args[0]))]
    hooks += [block.register_forward_hook(keep) for block in blocks]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if len(states) != len(blocks) + 1:
        raise RuntimeError(f"expected {len(blocks) + 1} hidden states, the forward produced {len(states)}")
    return states


def layer_cka(model_a, model_b, idx):
    """Linear CKA between the two models' hidden states at every depth (embedding, then each block) on idx."""
    return [linear_cka(a, b) for a, b in zip(layer_states(model_a, idx), layer_states(model_b, idx), strict=True)]
