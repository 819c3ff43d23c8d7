"""The hand-written batched sampler with a KV cache, and the log-probs the PPO update recomputes.

  sample             left-padded prompts -> new tokens, their mask and their log-probs
  sequence_logprobs  log-probs of given tokens with gradients, chunked over the vocabulary
  sampling_logprobs  the one place that turns logits into log-probs (full softmax of logits / T)
  compile_layers     opt-in torch.compile of the decoder layers' cache-free parts (--compile)

Tricks, each explained where it lives: position ids from the attention mask (left padding),
an in-place KV buffer per layer, the shared prompt prefix prefilled once, finished rows dropped
from the batch, inverse-CDF sampling. No `model.generate` inside.
"""
import functools
import shutil
import sys
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

# A prompt prefix that every row of a batch shares runs once, at batch 1, when it is at least this
# long: every prompt of a role starts with the same chat template and instructions (100-300 tokens),
# and a shorter shared part is not worth a pass of its own.
MIN_SHARED_PREFIX = 16


def sampling_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs (float32) of the full temperature-scaled softmax, log_softmax(logits / T).

    The one place that turns logits into the log-probs the PPO update and the KL penalty use; the
    sampler reports the same numbers for the tokens it draws. A top-p nucleus is only a sampling
    detail (`nucleus`): log-probs taken inside each model's own nucleus give the tokens outside it
    -inf, so a token the policy sampled outside the reference's nucleus made the KL infinite.
    Greedy (T == 0) has no proper distribution: we report the plain softmax (T = 1).
    """
    logits = logits.float()
    return (logits / temperature if temperature > 0 else logits).log_softmax(-1)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(batch, vocab) probabilities with the tokens outside the top-p nucleus set to 0 (not renormalised)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # drop a token when the tokens ranked above it already hold top_p of the mass
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))


def sample_next_token(logits, temperature, top_p, generator=None):
    """(batch, vocab) logits -> (batch,) token ids drawn from the top-p nucleus of softmax(logits / T),
    and their log-probs under the full softmax (sampling_logprobs)."""
    logp = sampling_logprobs(logits, temperature)
    if temperature == 0:
        token = logp.argmax(-1)
    else:
        # inverse-CDF sampling: one uniform number per row. torch.multinomial draws one random
        # number per vocabulary entry (49k), which costs ~8 ms a step at batch 8 on a CPU.
        cdf = nucleus(logp.exp(), top_p).double().cumsum(-1)  # (batch, vocab); dropped tokens add nothing
        # drawn on the generator's own device, then moved: CUDA refuses a CPU generator
        u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else cdf.device).to(cdf.device)
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp(max=cdf.shape[1] - 1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts every row: position = number of real tokens before it."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class KVBuffer(DynamicLayer):
    """One layer's keys and values, in a buffer allocated once for prompt + all new tokens.

    Hugging Face's DynamicLayer grows with torch.cat, copying the whole cache at every token;
    we write each new token's keys and values in place and hand attention a view of the filled part.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        B, H, _, D = key_states.shape  # (batch, kv heads, time, head dim)
        self.k_buf = key_states.new_empty(B, H, self.capacity, D)
        self.v_buf = value_states.new_empty(B, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.k_buf[:, :, self.length:self.length + n] = key_states
        self.v_buf[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int):
        self.k_buf, self.v_buf = self.k_buf.repeat_interleave(repeats, 0), self.v_buf.repeat_interleave(repeats, 0)
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]

    def batch_select_indices(self, indices):
        self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]


@dataclass
class Sample:
    tokens: torch.Tensor    # (batch, new) sampled ids; after a row's EOS: pad
    mask: torch.Tensor      # (batch, new) 1 for real tokens (the EOS included), 0 after it
    logprobs: torch.Tensor  # (batch, new) float32 log-prob of each token, full softmax of logits / T


def prefill(model, input_ids, attention_mask, capacity, min_shared=MIN_SHARED_PREFIX):
    """Run the prompts through the model once, filling a fresh KV cache.

    Returns the model output (last position's logits), the cache, and the prompts' attention
    mask as laid out in the cache. When the rows share a prefix of `min_shared` tokens or more,
    it is run at batch 1 and copied to every row; the rest of each row follows it, left-padded:
    [shared prefix | pad pad | own tokens]. The positions (cumulative sum of the mask) are the
    same as in the plain layout [pad pad | shared prefix | own tokens], so the model sees the same
    inputs; only the order of floating-point sums differs.
    """
    B, P = input_ids.shape
    n_layers = model.config.get_text_config().num_hidden_layers
    cache = Cache(layers=[KVBuffer(capacity) for _ in range(n_layers)])
    K = common_prefix_length([row[m.bool()] for row, m in zip(input_ids, attention_mask)])
    if K < min_shared:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                    cache=cache, use_cache=True, logits_to_keep=1)
        return out, cache, attention_mask
    own = attention_mask.sum(1) - K  # (batch,) tokens after the shared prefix
    S = int(own.max())
    start0 = P - int(attention_mask[0].sum())  # row 0's first real column
    prefix = input_ids[:1, start0:start0 + K]
    model(input_ids=prefix, position_ids=torch.arange(K, device=input_ids.device)[None], cache=cache,
          use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(B)
    mask = torch.cat([attention_mask.new_ones(B, K),
                      (torch.arange(S, device=input_ids.device)[None, :] >= S - own[:, None]).long()], dim=1)
    out = model(input_ids=input_ids[:, P - S:], attention_mask=mask, position_ids=position_ids_from_mask(mask)[:, K:],
                cache=cache, use_cache=True, logits_to_keep=1)
    return out, cache, mask


@torch.inference_mode()
def sample(model, input_ids, attention_mask, max_new_tokens, temperature=1.0, top_p=1.0,
           eos_token_id=None, pad_token_id=0, generator=None, use_cache=True, share_prefix=True) -> Sample:
    """Sample up to `max_new_tokens` for a left-padded batch, one token per step.

    With the cache, the prompts are run once (prefill) and each step feeds one new token, reusing
    the keys and values of all earlier ones. Rows that have hit EOS are dropped from the batch
    (and from the cache), so a batch gets cheaper as its rows finish. `use_cache=False` re-runs
    the whole sequence every step: the slow baseline that bench.py and the tests compare with.
    `share_prefix=False` prefills every row in full, exactly as `model.generate` does.
    """
    was_training = model.training
    model.eval()
    try:
        B, P = input_ids.shape
        device = input_ids.device
        tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        if use_cache:
            out, cache, prompt_mask = prefill(model, input_ids, attention_mask, P + max_new_tokens,
                                              min_shared=MIN_SHARED_PREFIX if share_prefix else P + 1)
        else:
            out = model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=1)
            prompt_mask = attention_mask
        L = prompt_mask.shape[1]
        # the attention mask of prompt + everything we may generate, sliced as we go
        full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(B, max_new_tokens)], dim=1)
        live = torch.arange(B, device=device)  # rows still generating, as indices into the batch
        for t in range(max_new_tokens):
            token, logp = sample_next_token(out.logits[:, -1, :], temperature, top_p, generator)
            tokens[live, t] = token
            logprobs[live, t] = logp
            if t == max_new_tokens - 1:
                break
            if eos_token_id is not None:
                finished = token == eos_token_id
                if finished.any():
                    lengths[live[finished]] = t + 1
                    keep = (~finished).nonzero().squeeze(-1)
                    if keep.numel() == 0:
                        break
                    live, token = live[keep], token[keep]
                    if use_cache:
                        cache.batch_select_indices(keep)
            mask = full_mask[live, :L + t + 1]
            if use_cache:
                out = model(input_ids=token[:, None], attention_mask=mask,
                            position_ids=position_ids_from_mask(mask)[:, -1:], cache=cache, use_cache=True)
            else:
                seq = torch.cat([input_ids[live], tokens[live, :t + 1]], dim=1)
                out = model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                            use_cache=False, logits_to_keep=1)
        n = int(lengths.max())
        new_mask = torch.arange(n, device=device)[None, :] < lengths[:, None]
        return Sample(tokens[:, :n], new_mask.long(), logprobs[:, :n].masked_fill(~new_mask, 0.0))
    finally:
        model.train(was_training)


def _token_logprobs(lm_head, hidden, tokens, temperature):
    """hidden (b, n, H) -> log-prob (b, n) of `tokens`: the only place full (b, n, vocab) logits exist."""
    logp = sampling_logprobs(lm_head(hidden), temperature)
    return logp.gather(-1, tokens[..., None]).squeeze(-1)


def sequence_logprobs(model, input_ids, attention_mask, n_new, temperature=1.0, chunk_rows=4,
                      prefix_ids=None):
    """Per-token log-probs (batch, n_new) of the last `n_new` tokens of each row.

    `input_ids` is prompt (left-padded) + generated tokens, `attention_mask` marks real tokens.
    `prefix_ids` (optional, 1-D) is a prompt prefix that every row shares and that `input_ids`
    leaves out: it runs once at batch 1 and its keys and values are copied to every row, gradients
    included (the role prompts share 130-230 tokens, so this halves a training forward).
    The vocabulary-sized logits are made only for the generated positions and only `chunk_rows`
    rows at a time. Under autograd each chunk is checkpointed, so its logits are recomputed in
    backward rather than kept: memory grows with chunk_rows x n_new x vocab, not batch x length x
    vocab (49k x 4 bytes per token here).
    """
    decoder = model.get_decoder()
    cache, K = None, 0
    if prefix_ids is not None and len(prefix_ids):
        K = len(prefix_ids)
        cache = DynamicCache(config=model.config)
        decoder(input_ids=prefix_ids[None], position_ids=torch.arange(K, device=input_ids.device)[None],
                cache=cache, use_cache=True)
        cache.batch_repeat_interleave(input_ids.shape[0])
        attention_mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], K), attention_mask], dim=1)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask)[:, K:],
                     cache=cache, use_cache=cache is not None).last_hidden_state
    hidden = hidden[:, -n_new - 1:-1]      # the state before token t predicts token t
    targets = input_ids[:, -n_new:]
    lm_head = model.get_output_embeddings()
    parts = []
    for i in range(0, input_ids.shape[0], chunk_rows):
        h, y = hidden[i:i + chunk_rows], targets[i:i + chunk_rows]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_token_logprobs, lm_head, h, y, temperature, use_reentrant=False))
        else:
            parts.append(_token_logprobs(lm_head, h, y, temperature))
    return torch.cat(parts, dim=0)


def pack(prompts, generations, pad_id):
    """Rows of [pad | prompt | generation | pad] from unpadded 1-D id tensors: prompts are
    left-padded as the sampler lays them out, generations right-padded after them.

    Returns (ids, mask, gen_mask); gen_mask (batch, longest generation) marks generated tokens.
    """
    P, N = max(map(len, prompts)), max(map(len, generations))
    ids = torch.full((len(prompts), P + N), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, g) in enumerate(zip(prompts, generations)):
        ids[i, P - len(p):P + len(g)] = torch.cat([p, g])
        mask[i, P - len(p):P + len(g)] = 1
    return ids, mask, mask[:, P:]


def common_prefix_length(prompts) -> int:
    """How many leading tokens all (unpadded, 1-D) prompts share, leaving each at least one of its own."""
    n = min(map(len, prompts)) - 1
    if len(prompts) < 2 or n <= 0:
        return 0
    stacked = torch.stack([p[:n] for p in prompts])
    differs = (stacked != stacked[:1]).any(0)
    return int(differs.nonzero()[0]) if differs.any() else n


def generation_logprobs(model, prompts, generations, pad_id, temperature=1.0, min_shared=MIN_SHARED_PREFIX):
    """Log-probs (batch, longest generation), float32, of each generation given its prompt, and
    the generation mask, both on the model's device. A shared prompt prefix runs once."""
    device = next(model.parameters()).device
    K = common_prefix_length(prompts)
    K = K if K >= min_shared else 0
    ids, mask, gen_mask = pack([p[K:] for p in prompts], generations, pad_id)
    logp = sequence_logprobs(model, ids.to(device), mask.to(device), gen_mask.shape[1], temperature,
                             prefix_ids=prompts[0][:K].to(device) if K else None)
    return logp.float(), gen_mask.to(device).float()


@functools.cache
def compiler_works() -> bool:
    """Whether torch.compile works here, tried once on a tiny function (a broken tool chain fails
    here, not in the middle of a run); if not, one warning line says why."""
    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        print("warning: --compile needs a C++ compiler (g++ or clang++); running uncompiled", file=sys.stderr)
        return False
    try:
        torch.compile(lambda x: x.sin() + 1)(torch.ones(2))
    except Exception as e:  # noqa: BLE001 (inductor raises many kinds)
        print(f"warning: --compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
              "running uncompiled", file=sys.stderr)
        return False
    return True


def compile_layers(model) -> bool:
    """torch.compile, in place, the parts of each decoder layer that do not touch the KV cache: the
    MLP and the two RMSNorms, where compiling fuses the elementwise work (SiLU x up, the norm's
    square-mean-scale) around the matmuls, for the sampler's decode steps and the training and
    no-grad forwards alike (bench.py --selfplay-steps N -- --compile measures what it buys). Whole layers compile badly: the cache's Python state
    (layer index, fill level) made every layer and step a recompile. The layers share one code path,
    so each compiled graph serves them all.
    Returns whether it compiled: without a working C++ compiler it prints one warning line and the
    model stays as it was; a later failure on some input shape runs that call uncompiled.
    """
    if not compiler_works():
        return False
    parts = [getattr(layer, name) for layer in getattr(model.get_decoder(), "layers", [])
             for name in ("mlp", "input_layernorm", "post_attention_layernorm") if hasattr(layer, name)]
    if not parts:
        print(f"warning: --compile: no Llama-style decoder layers in {type(model).__name__}; running uncompiled",
              file=sys.stderr)
        return False
    torch._dynamo.config.suppress_errors = True  # a graph that will not compile falls back to eager
    # one graph per variant: batch 1 (the shared prefix) or more, sampling (inference mode), no-grad
    # and training passes, LoRA adapters on and off; past the limit (8) dynamo would go eager with a warning
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for part in parts:
        part.compile(dynamic=True)
    return True
