"""Sampling from a DecoderLM: prefill the prompt, then decode token by
token through the incremental path, all inside one jitted function (a
`lax.scan` over steps), so there is no Python loop and no recompilation per
token. Greedy (temperature 0), temperature and top-k sampling.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits_BxV, key, temperature, top_k: int | None):
  """Greedy where temperature == 0, else softmax(logits / T) over the top k."""
  greedy = jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
  if top_k is not None:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  sampled = jax.random.categorical(key, scaled, -1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "top_k", "max_len"))
def _generate(graphdef, state, prompt_BxP, key, temperature, *,
              max_new_tokens: int, top_k: int | None, max_len: int):
  model = nnx.merge(graphdef, state)
  B = prompt_BxP.shape[0]
  cache = model.init_cache(B, max_len)
  logits, cache = model(prompt_BxP, cache=cache)
  keys = jax.random.split(key, max_new_tokens)
  first = sample_logits(logits[:, -1], keys[0], temperature, top_k)

  def step(carry, key):
    tok_B, cache = carry
    logits, cache = model(tok_B[:, None], cache=cache)
    nxt = sample_logits(logits[:, -1], key, temperature, top_k)
    return (nxt, cache), nxt

  _, rest = jax.lax.scan(step, (first, cache), keys[1:])
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(model: nnx.Module, prompt_BxP: jax.Array, *, max_new_tokens: int,
             key: jax.Array | None = None, temperature: float = 0.0,
             top_k: int | None = None, max_len: int | None = None) -> jax.Array:
  """Return [B, max_new_tokens] tokens sampled after `prompt_BxP`.

  max_len: cache length (default prompt + max_new_tokens); must hold the
  prompt and every token fed back.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if prompt_BxP.ndim != 2 or prompt_BxP.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length>=1], got {prompt_BxP.shape}")
  needed = prompt_BxP.shape[1] + max_new_tokens - 1
  max_len = needed + 1 if max_len is None else max_len
  if needed > max_len:
    raise ValueError(f"prompt ({prompt_BxP.shape[1]}) + max_new_tokens "
                     f"({max_new_tokens}) needs a cache of {needed}, but "
                     f"max_len={max_len}")
  if top_k is not None and not 1 <= top_k <= model.cfg.vocab_size:
    raise ValueError(f"top_k must be in [1, vocab_size={model.cfg.vocab_size}], "
                     f"got {top_k}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  key = jax.random.key(0) if key is None else key
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt_BxP.astype(jnp.int32), key,
                   jnp.float32(temperature), max_new_tokens=max_new_tokens,
                   top_k=top_k, max_len=max_len)
