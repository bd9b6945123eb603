"""Direct computations the captures are checked against: one prompt alone (no padding), plain hooks."""
import torch

from lit_sahs.targets import prompting
from lit_sahs.targets.sites import output_projections


def user_token_inputs(target, text):
    """(every layer's o_proj input at the prompt's own tokens [layers, n_user, heads*head_dim], the
    encoding, the user mask) for `text` alone."""
    enc = prompting.encode(target, [text])
    mask = prompting.Encoder.of(target).user_mask([text])[0]
    inputs = {}
    hooks = [p.register_forward_pre_hook(lambda m, a, l=l: inputs.__setitem__(l, a[0][0].detach().clone()))
             for l, p in enumerate(output_projections(target.model))]
    try:
        with torch.no_grad():
            target.model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([inputs[l][mask] for l in range(target.geometry.num_layers)]), enc, mask
