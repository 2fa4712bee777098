"""models.llama prefill through the KV cache: a prompt prefilled from an empty cache (positions 0..T-1)
runs SDPA with its causal flag instead of an explicit mask; the logits are those of the masked path."""
import torch
import torch.nn.functional as F

import models.llama as llama
from models.config import ModelConfig
from models.llama import Transformer


def tiny() -> Transformer:
    cfg = ModelConfig(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@torch.inference_mode()
def test_prefill_from_start_uses_the_causal_flag_and_matches_the_masked_path(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask") is not None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(llama.F, "scaled_dot_product_attention", spy)
    model = tiny()
    model.setup_cache(2, 64)
    tokens = torch.randint(0, 200, (2, 20))
    pos = torch.arange(20).expand(2, 20)
    full = model(tokens, positions=pos, slots=torch.tensor([0, 1]))
    assert calls and all(c == (True, False) for c in calls)  # causal flag, no mask tensor

    # The same prompt in two pieces: the second (positions 8..19) is not from the start, so it takes the
    # explicit mask over the 8 cached keys; its logits are the full prefill's.
    calls.clear()
    model(tokens[:, :8], positions=pos[:, :8], slots=torch.tensor([0, 1]))
    calls.clear()
    rest = model(tokens[:, 8:], positions=pos[:, 8:], slots=torch.tensor([0, 1]))
    assert calls and all(c == (False, True) for c in calls)
    torch.testing.assert_close(rest, full[:, 8:], rtol=1e-5, atol=1e-5)
    # and both equal the cache-free causal window (evaluation's path)
    torch.testing.assert_close(model(tokens), full, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_rows_at_other_positions_keep_the_mask():
    model = tiny()
    model.setup_cache(2, 64)
    tokens = torch.randint(0, 200, (2, 10))
    shifted = torch.arange(10).expand(2, 10) + torch.tensor([[0], [3]])  # row 1 starts at 3: not from the start
    out = model(tokens, positions=shifted, slots=torch.tensor([0, 1]))
    alone = model(tokens[:1], positions=shifted[:1], slots=torch.tensor([0]))
    torch.testing.assert_close(out[:1], alone, rtol=1e-5, atol=1e-5)
