"""Direct preference optimisation: sequence log-probs and the DPO loss family.

docs/rlhf_details.md, critic-free and offline section. With y_w the chosen and y_l the
rejected response of a pair, and log-probs summed over response tokens,

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))

  "sigmoid"       -log sigmoid(beta * h)                      (Rafailov et al. 2023)
  "hinge"         max(0, 1 - beta * h)                        (SLiC-style)
  "ipo"           (h_mean - 1 / (2 * beta))^2, with h_mean built from
                  length-averaged log-ratios                  (Azar et al. 2023)
  "conservative"  -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h),
                  eps = label_smoothing, the chance a label is flipped (cDPO)

Soft labels: a pair may carry a target t, the probability that the chosen
response is preferred (e.g. from the rater's confidence, as the reward model's
soft labels). Sigmoid and conservative become the cross-entropy
-t' log sigmoid(beta h) - (1 - t') log sigmoid(-beta h), with
t' = (1 - eps) t + eps (1 - t) (eps = label_smoothing, 0 for sigmoid; t = 1 gives
the forms above); IPO regresses h_mean onto (2t' - 1) / (2 beta), the minimiser of
its loss averaged over a label drawn with probability t. The hinge loss has no
probability to match and refuses a target.

Ties: a pair labelled a tie has a preference probability of 1/2, so the
probabilistic losses give it the soft target 1/2 (whatever its target says):
sigmoid and conservative use -(1/2) log sigmoid(beta h) - (1/2) log sigmoid(-beta h)
(minimised at h = 0, the reward model's tie loss), IPO regresses h_mean onto 0.
The hinge loss has no target for "equally good": a tie pair's hinge loss is 0.

Everything is float32, pure and jittable. Shape legend: B pairs, T length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.rl.logprobs import shift_for_next_token, token_logprobs

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "conservative")


def _concrete(x) -> float | None:
  """`x` as a Python float when its value is known now; None for a tracer (inside jit)."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return float(x)
  except (TypeError, ValueError):
    return None


def sequence_logps(token_logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sequence sums of response-token log-probs, and the number of those tokens.

  Positions outside `mask` are read through `jnp.where`, so NaN or inf there
  (e.g. at padding) reaches neither the sum nor its gradient.

  Args:
    token_logps: [B, T] float log-probs of each target token.
    mask: [B, T] bool, True on response targets (response tokens and EOS).

  Returns:
    sums [B] float32 and counts [B] float32.
  """
  mask = mask.astype(jnp.bool_)
  sums = jnp.sum(jnp.where(mask, token_logps.astype(jnp.float32), 0.0), axis=-1)
  return sums, jnp.sum(mask, axis=-1).astype(jnp.float32)


def response_logps(
  logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
  """Sequence log-prob sums and token counts of right-padded SFT-layout rows.

  Logit t predicts token t + 1 (`shift_for_next_token`), so the response's
  log-prob is read from the positions just before its tokens.

  Args:
    logits: [B, T, V] the model's logits on `tokens`.
    tokens: [B, T] int, rows `BOS + prompt + response + EOS + PAD...`.
    loss_mask: [B, T] bool, True where `tokens` holds a response token or the
      EOS (`loader.sft_collate`'s loss_mask).
    temperature: logits are divided by it (1 = the model's own distribution).

  Returns:
    sums [B] float32 and counts [B] float32 (`sequence_logps`).
  """
  targets, target_mask = shift_for_next_token(tokens, loss_mask)
  return sequence_logps(token_logprobs(logits, targets, temperature), target_mask)


# ----------------------------------------------------- shared-prompt rows
#
# A pair's chosen and rejected rows begin with the same BOS + prompt, so the prompt's hidden
# states are the same in both. One row per pair, `BOS + prompt + chosen + rejected`, reads
# the prompt once: the chosen tokens attend to the prompt and the chosen tokens before them,
# the rejected tokens to the prompt and the rejected tokens before them (never to the
# chosen ones), and both responses take positions from the prompt's end, so every logit is
# the one the pair's own row gives (the same up to float rounding). The first token of each
# response is predicted from the prompt's last position. A pair whose two prompts differ
# (one was cut to fit max_len and the other not) puts its two rows side by side instead.
# The targets are listed apart, in slots of their own (the responses' tokens, the position
# whose logits predict each, which response it belongs to), so the LM head runs on those
# positions only, not on the prompt's.

SHARED_FIELDS = ("tokens", "mask", "segment", "positions", "targets", "source", "side")
PROMPT, CHOSEN, REJECTED = 1, 2, 3  # segment ids (0: padding)
_ROW = ("tokens", "mask", "loss_mask")


def shared_layouts(tables, multiple: int = 8) -> tuple[list[list], tuple[int, int]]:
  """Each pair table's unpadded shared-prompt rows (for `share_prompts`), and the widths
  all of them fit, (row length, target slots), each rounded up to `multiple`: one compiled
  shape serves them all. Tables hold SFT-layout {chosen,rejected}_{tokens,mask,loss_mask}."""
  layouts = [_layouts(table) for table in tables]
  rows = [row for table_rows in layouts for row in table_rows]
  longest = max([1] + [len(row[0]) for row in rows])
  targets = max([1] + [int(np.count_nonzero(row[4])) for row in rows])
  return layouts, (_round_up(longest, multiple), _round_up(targets, multiple))


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def shared_widths(tables, multiple: int = 8) -> tuple[int, int]:
  """(row length, target slots) every pair of `tables` fits in shared-prompt layout
  (`shared_layouts`)."""
  return shared_layouts(tables, multiple)[1]


def _layouts(table):
  """Per pair: its shared-prompt row unpadded, as (tokens, segment, position, source,
  side) arrays (see `share_prompts`)."""
  c_tokens, c_mask, c_loss = (table[f"chosen_{f}"] for f in _ROW)
  r_tokens, r_mask, r_loss = (table[f"rejected_{f}"] for f in _ROW)
  out = []
  for i in range(len(c_tokens)):
    c_len, r_len = int(c_mask[i].sum()), int(r_mask[i].sum())
    p = _prompt_length(c_loss[i], c_len)
    shared = (
      p is not None
      and p == _prompt_length(r_loss[i], r_len)
      and np.array_equal(c_tokens[i, :p], r_tokens[i, :p])
    )
    p = p if shared else 0  # unshared: the two rows side by side
    tokens = np.concatenate([c_tokens[i, :c_len], r_tokens[i, p:r_len]])
    segment = np.repeat([PROMPT, CHOSEN, REJECTED], [p, c_len - p, r_len - p])
    position = np.concatenate([np.arange(c_len), np.arange(p, r_len)])
    source = np.arange(len(tokens)) - 1  # token k is predicted by the logits at k - 1 ...
    if p and r_len > p:  # ... the rejected response's first by the prompt's last position
      source[c_len] = p - 1
    side = np.concatenate([c_loss[i, :c_len], 2 * r_loss[i, p:r_len]])
    out.append((tokens, segment, position, np.maximum(source, 0), side))
  return out


def _prompt_length(loss_mask, length: int) -> int | None:
  """Where the targets start, when they are the row's last tokens and something precedes
  them (the layout every prompt/response row has); else None."""
  targets = np.flatnonzero(loss_mask[:length])
  if not len(targets) or targets[0] == 0 or len(targets) != length - targets[0]:
    return None
  return int(targets[0])


def share_prompts(
  table, widths: tuple[int, int], pad_id: int, layout=None
) -> dict[str, np.ndarray]:
  """The shared-prompt rows of a pair table's SFT-layout rows
  ({chosen,rejected}_{tokens,mask,loss_mask} [N, T], `loader.sft_collate`'s layout), in
  `widths` = (row length L, target slots K) (`shared_widths`).

  Returns, each prefixed "shared_": the rows [N, L]: tokens (int32, `pad_id` after the
  row), mask (bool, real tokens), segment (int8: PROMPT, CHOSEN, REJECTED; 0 on padding),
  positions (int32: each response on from the prompt's end); and the targets [N, K], the
  chosen response's then the rejected one's: targets (int32 token ids), source (int32:
  the row position whose logits predict each) and side (int8: 1 chosen, 2 rejected, 0 on
  empty slots). A pair without targets (left out for its length) is an empty row.
  `layout`: the table's rows from `shared_layouts`, when already made.
  """
  length, slots = widths
  rows = _layouts(table) if layout is None else layout
  n = len(rows)
  out = {
    "tokens": np.full((n, length), pad_id, np.int32),
    "mask": np.zeros((n, length), bool),
    "segment": np.zeros((n, length), np.int8),
    "positions": np.zeros((n, length), np.int32),
    "targets": np.full((n, slots), pad_id, np.int32),
    "source": np.zeros((n, slots), np.int32),
    "side": np.zeros((n, slots), np.int8),
  }
  for i, (tokens, segment, position, source, side) in enumerate(rows):
    k, picked = len(tokens), np.flatnonzero(side)
    if k > length or len(picked) > slots:
      raise ValueError(
        f"pair {i} needs {k} tokens and {len(picked)} target slots in shared-prompt layout; "
        f"the rows hold {length} and {slots}"
      )
    values = dict(tokens=tokens, mask=True, segment=segment, positions=position)
    for name, value in values.items():
      out[name][i, :k] = value
    targets = dict(targets=tokens[picked], source=source[picked], side=side[picked])
    for name, value in targets.items():
      out[name][i, : len(picked)] = value
  return {f"shared_{k}": v for k, v in out.items()}


def shared_attention_mask(segment: jax.Array) -> jax.Array:
  """[B, L] segment ids -> [B, L, L] bool: causal, a response token sees the prompt and its
  own response, a prompt token the prompt; no token sees padding (what a padding position
  sees is never read)."""
  n = segment.shape[-1]
  causal = jnp.tril(jnp.ones((n, n), jnp.bool_))
  query, key = segment[:, :, None], segment[:, None, :]
  return causal[None] & (key > 0) & ((key == PROMPT) | (key == query))


def shared_response_logps(
  logits: jax.Array, targets: jax.Array, side: jax.Array, temperature=1.0
) -> dict[str, jax.Array]:
  """Sequence log-prob sums and target counts [B] of the chosen and rejected responses of
  shared-prompt rows (`share_prompts`): {"chosen", "rejected", "chosen_len",
  "rejected_len"}, what `response_logps` gives on the two rows.

  Args:
    logits: [B, K, V], the logits at each target's source position (the LM head run at
      `shared_source`, `LanguageModel(logits_at=)`).
    targets, side: [B, K] `shared_targets` and `shared_side`.
  """
  token_logps = token_logprobs(logits, targets, temperature)  # [B, K]
  chosen, chosen_len = sequence_logps(token_logps, side == 1)
  rejected, rejected_len = sequence_logps(token_logps, side == 2)
  return dict(chosen=chosen, rejected=rejected, chosen_len=chosen_len, rejected_len=rejected_len)


def dpo_loss(
  policy_chosen_logps: jax.Array,
  policy_rejected_logps: jax.Array,
  ref_chosen_logps: jax.Array,
  ref_rejected_logps: jax.Array,
  *,
  beta: float,
  loss_type: str,
  label_smoothing: float = 0.0,
  chosen_lengths: jax.Array | None = None,
  rejected_lengths: jax.Array | None = None,
  tie: jax.Array | None = None,
  target: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-pair DPO loss (see the module docstring for the four forms).

  Args:
    policy_chosen_logps, policy_rejected_logps: [B] float, log pi of each
      response summed over its tokens (`sequence_logps`).
    ref_chosen_logps, ref_rejected_logps: [B] float, the same under the frozen
      reference; no gradient flows into them.
    beta: > 0, the inverse temperature of the implicit reward beta * log(pi/ref).
    loss_type: "sigmoid" | "ipo" | "hinge" | "conservative".
    label_smoothing: eps in [0, 1/2] of "conservative" (0 gives "sigmoid");
      must be 0 for the other loss types.
    chosen_lengths, rejected_lengths: [B] float response token counts; needed
      by "ipo" (its log-ratios are length-averaged), unused otherwise.
    tie: [B] bool, the pair was labelled a tie (soft target 1/2); None = none.
    target: [B] float in [0, 1], the probability that the chosen response is
      preferred (soft labels); None = 1 for every pair (hard labels). Not for
      "hinge".

  Returns:
    (loss [B] float32, metrics: dict of [B] float32):
      rewards/chosen    beta * (log pi(y_w) - log ref(y_w)), the implicit reward
      rewards/rejected  beta * (log pi(y_l) - log ref(y_l))
      rewards/margins   rewards/chosen - rewards/rejected (= beta * h)
      rewards/accuracies  1 where rewards/chosen > rewards/rejected, else 0
      logps/chosen, logps/rejected  the policy's sequence log-probs
  Raises:
    ValueError: unknown loss_type, beta <= 0, label_smoothing outside [0, 1/2]
      or set for a loss other than "conservative", "ipo" without lengths, a
      target with "hinge".
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"Unknown DPO loss_type {loss_type!r}; expected one of {LOSS_TYPES}.")
  concrete_beta = _concrete(beta)
  if concrete_beta is not None and not concrete_beta > 0:
    # Any concrete number: a NumPy or JAX zero is as wrong as a Python one (IPO divides by it).
    raise ValueError(f"DPO beta must be > 0, got {beta!r}.")
  if not 0.0 <= label_smoothing <= 0.5:
    raise ValueError(f"DPO label_smoothing must be in [0, 0.5], got {label_smoothing!r}.")
  if label_smoothing and loss_type != "conservative":
    raise ValueError(
      f"DPO label_smoothing={label_smoothing!r} is used by loss_type='conservative' only, "
      f"not {loss_type!r}."
    )
  if target is not None and loss_type == "hinge":
    raise ValueError(
      "DPO loss_type='hinge' has no preference probability to match: it takes no soft "
      "label target (use sigmoid, conservative or ipo)."
    )
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  policy_chosen_logps, policy_rejected_logps = f32(policy_chosen_logps), f32(policy_rejected_logps)
  chosen_ratio = policy_chosen_logps - jax.lax.stop_gradient(f32(ref_chosen_logps))
  rejected_ratio = policy_rejected_logps - jax.lax.stop_gradient(f32(ref_rejected_logps))
  h = chosen_ratio - rejected_ratio
  tie = jnp.zeros(h.shape, jnp.bool_) if tie is None else jnp.asarray(tie, jnp.bool_)
  # The probability that the chosen response is preferred: the label's target,
  # smoothed by cDPO's flip chance eps (0 but for "conservative"); a tie is 1/2.
  eps = label_smoothing if loss_type == "conservative" else 0.0
  t = jnp.ones(h.shape, jnp.float32) if target is None else f32(target)
  t = jnp.where(tie, 0.5, (1.0 - eps) * t + eps * (1.0 - t))

  if loss_type == "ipo":
    if chosen_lengths is None or rejected_lengths is None:
      raise ValueError("DPO loss_type='ipo' needs chosen_lengths and rejected_lengths.")
    h_mean = chosen_ratio / jnp.maximum(f32(chosen_lengths), 1.0) - rejected_ratio / jnp.maximum(
      f32(rejected_lengths), 1.0
    )
    loss = jnp.square(h_mean - (2.0 * t - 1.0) / (2.0 * beta))
  elif loss_type == "hinge":
    loss = jnp.where(tie, 0.0, jax.nn.relu(1.0 - beta * h))
  else:
    # sigmoid is conservative with eps = 0; a tie is t = 1/2.
    loss = -t * jax.nn.log_sigmoid(beta * h) - (1.0 - t) * jax.nn.log_sigmoid(-beta * h)

  chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
  metrics = {
    "rewards/chosen": chosen_rewards,
    "rewards/rejected": rejected_rewards,
    "rewards/margins": chosen_rewards - rejected_rewards,
    "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
    "logps/chosen": jax.lax.stop_gradient(policy_chosen_logps),
    "logps/rejected": jax.lax.stop_gradient(policy_rejected_logps),
  }
  return loss, metrics
