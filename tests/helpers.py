"""Small helpers shared by test modules."""

import math

import pytest
import torch


@torch.no_grad()
def spread_init(model: torch.nn.Module) -> torch.nn.Module:
    """Weights scaled so attention is far from uniform and logits spread over several units: a
    wrong rotary layout or a swapped tensor then moves logits by far more than test tolerances."""
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 1 / math.sqrt(p.shape[1]))
        else:
            p.uniform_(0.5, 1.5)
    return model


def reference_render(template: str, messages, add_generation_prompt: bool, **context) -> str:
    """transformers' renderer: the independent reference for template output."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **context
    )
    return rendered[0]
