"""Building blocks that sequence mixers share, one home each.

  conv       ShortConv: depthwise causal short convolution with decode state;
             ConvHistory: the input history that decodes long convolutions
  shift      token_shift / lerp / shift_ramp: RWKV's token shift
  attention  AttentionOptions, resolve_heads, build_position, QKVProjection,
             KVCache and its append: the softmax-attention family's plumbing
  sparse     BlockSparseMixer, SparseAttention, FarSparse and the pattern
             helpers of the block-sparse attention mixers
  recurrent  RecurrentMixer / RecurrentCache (fixed-size decode state),
             head_dense, GatedHeadNorm
  linear     LinearMixer / FeatureAttention: the linear-attention family
  ssm        complex parameters, HiPPO / S4D inits, diagonal SSMs, the S4
             family's gated output
  lti        LTIMixer: the S4 / S4D / DSS layer shell

Segment helpers (`segment_starts`, `segment_positions`) live with the
positions they define, in `layers.positions`. The mixer contract is
`layers.mixers.base`. A mixer module imports only these, the contract,
`layers.positions`, `layers.params`, `layers.norms` and `layers.kernels`;
never another mixer module.
"""
