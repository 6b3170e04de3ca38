"""One-off: ul2.decoding.beam_search against the real t5x.decoding.beam_search."""
import jax, jax.numpy as jnp, numpy as np
from t5x import decoding as t5x_decoding
from ul2 import decoding, network

def t5x_beam(model, params, enc, beam, L, alpha):
  batch = enc.shape[0]
  encoded = model.apply({'params': params}, enc, method='encode')
  enc_rep = jnp.repeat(enc, beam, axis=0); encoded_rep = jnp.repeat(encoded, beam, axis=0)
  cache = network.init_decoding_cache(model, batch, enc.shape[1], L)
  def tokens_to_logits(state):
    logits, new = model.apply({'params': params, 'cache': state.cache}, encoded_rep, enc_rep,
                              state.cur_token, decode=True, max_decode_length=L,
                              method='decode', mutable=['cache'])
    return logits[:, 0].astype(jnp.float32), new['cache']
  return t5x_decoding.beam_search(jnp.zeros((batch, L), jnp.int32), cache, tokens_to_logits,
                                  eos_id=1, num_decodes=beam, alpha=alpha, max_decode_len=L)

cfg = network.Config(vocab_size=16, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                     num_encoder_layers=1, num_decoder_layers=1)
model = network.Transformer(cfg)
mismatch = 0
for seed in range(60):
  params = network.init_params(cfg, jax.random.key(seed))
  k = params['decoder']['logits_dense']['kernel']
  params['decoder']['logits_dense']['kernel'] = k.at[:, 1].multiply(1 + seed % 4)
  enc = jnp.asarray(np.random.default_rng(seed).integers(2, 16, (3, 5)), jnp.int32)
  ours, our_scores = decoding.beam_search(model, params, enc, 4, 6, 0.6)
  theirs, their_scores = t5x_beam(model, params, enc, 4, 6, 0.6)
  same = np.array_equal(np.asarray(ours), np.asarray(theirs)[:, ::-1]) and np.allclose(
      np.asarray(our_scores), np.asarray(their_scores)[:, ::-1], rtol=1e-5, atol=1e-5)
  mismatch += not same
print('random models: 60, differing from t5x.decoding.beam_search:', mismatch)
