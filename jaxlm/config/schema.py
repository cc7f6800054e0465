"""The typed config tree: one dataclass per section, each handed to the code that owns it.

`convert.from_dict` builds the tree from plain data (YAML, a checkpoint's metadata); every error
is a `ConfigError` whose message is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

# Every key carries a one-line description (`Doc[type, "..."]`); `jaxlm config` lists them.
Doc = Annotated


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for contexts longer than pretraining's (Llama 3.1's "llama3" rule:
    wavelengths beyond original_max_seq_len / low_freq_factor are stretched by `factor`, those below
    original_max_seq_len / high_freq_factor are kept, and the band between is interpolated)."""

    type: Doc[Literal["none", "llama3"], "none: plain RoPE; llama3: Llama 3.1's frequency scaling"] = "none"
    factor: Doc[float, "llama3: how much the low frequencies are slowed down"] = 8.0
    low_freq_factor: Doc[float, "llama3: wavelengths above original_max_seq_len / this are scaled fully"] = 1.0
    high_freq_factor: Doc[float, "llama3: wavelengths below original_max_seq_len / this are not scaled"] = 4.0
    original_max_seq_len: Doc[int, "llama3: the context length the model was pretrained with"] = 8192


@dataclass
class ModelConfig:
    vocab_size: Doc[int, "vocabulary size; at least the tokenizer's (257 = 256 bytes + <|endoftext|>)"] = 257
    d_model: Doc[int, "width of the residual stream"] = 128
    n_layers: Doc[int, "number of transformer blocks"] = 4
    share_blocks: Doc[int, "MobileLLM's immediate block-wise weight sharing: each block is applied this many times "
                           "in a row (n_layers blocks of parameters, n_layers * share_blocks layers of compute); "
                           "1 = off"] = 1
    n_heads: Doc[int, "attention (query) heads; must divide d_model"] = 4
    n_kv_heads: Doc[int, "key/value heads (grouped-query attention); must divide n_heads"] = 4
    d_head: Doc[int, "width of each attention head; 0 = d_model / n_heads (Qwen3 sets it explicitly)"] = 0
    d_ff: Doc[int, "hidden size of the dense feed-forward block"] = 344
    max_seq_len: Doc[int, "maximum positions the model supports (>= data.seq_len)"] = 1024
    norm: Doc[Literal["pre", "post", "none"], "where RMSNorm sits in each block"] = "pre"
    mlp: Doc[Literal["swiglu", "silu", "gelu"], "feed-forward activation (swiglu is gated)"] = "swiglu"
    position: Doc[Literal["rope", "none"], "positional encoding: rotary or none"] = "rope"
    rope_theta: Doc[float, "RoPE base frequency"] = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    attention_bias: Doc[bool, "learned biases on the q, k and v projections (Qwen2); false = bias-free as "
                              "Llama"] = False
    qk_norm: Doc[bool, "RMSNorm on each query and key head before RoPE (Qwen3): bounds the attention "
                       "logits"] = False
    tie_embeddings: Doc[bool, "share the input embedding with the output projection"] = False
    scale_tied_logits: Doc[bool, "with tie_embeddings: divide the logits by sqrt(d_model), which keeps jaxlm's "
                                 "sigma-1 embeddings from giving huge logits; false = plain h . E^T, as Hugging "
                                 "Face's tied models (Llama 3.2, small Qwen2.5, SmolLM)"] = True
    norm_eps: Doc[float, "RMSNorm epsilon (> 0)"] = 1e-5
    param_dtype: Doc[Literal["float32", "bfloat16"], "dtype the parameters are stored in"] = "float32"
    compute_dtype: Doc[Literal["float32", "bfloat16"], "dtype of matmuls and activations"] = "float32"
    causal: Doc[bool, "causal attention; false = bidirectional (masked-diffusion LMs)"] = True
    remat: Doc[Literal["none", "full", "dots_saveable"], "activation recomputation in the backward pass"] = "none"
    dropout: Doc[float, "dropout rate on the embedding output and on each residual branch (training only)"] = 0.0
    attention_dropout: Doc[float, "dropout rate on attention probabilities (training only; runs the xla "
                                  "attention kernel, the fast ones cannot drop out)"] = 0.0
    scan_layers: Doc[Literal["auto", True, False],
                     "compile one block and scan it over the layers (fast compiles) or unroll them; auto: "
                     "unrolled on GPU, where the scan cost 1.4x in step time, scanned elsewhere"] = "auto"
    attention_impl: Doc[Literal["auto", "xla", "cpu", "cudnn", "pallas_gpu", "splash"],
                        "attention kernel (model/kernels.py); auto: cpu on CPU, cudnn on GPU (pallas_gpu when "
                        "deterministic), splash on TPU"] = "auto"
    projection_impl: Doc[Literal["auto", "xla", "cpu"], "dense projection kernel; auto: cpu on CPU, else xla"] = "auto"
    gmm_impl: Doc[Literal["auto", "ragged_dot", "pallas_gpu", "megablox"],
                  "MoE dropless grouped matmul; auto: pallas_gpu on GPU, megablox on TPU, else ragged_dot"] = "auto"

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward; n_experts == 0 means a dense model."""

    n_experts: Doc[int, "experts per MoE layer; 0 = dense model"] = 0
    top_k: Doc[int, "experts each token is routed to"] = 2
    d_ff: Doc[int, "expert hidden size; 0 = model.d_ff"] = 0
    every: Doc[int, "an MoE block in every `every`-th layer (>= 1)"] = 1
    first_dense: Doc[int, "leading dense layers before the first MoE layer"] = 0
    n_shared: Doc[int, "shared experts every token passes through"] = 0
    shared_gate: Doc[bool, "scale the shared experts' output per token by sigmoid(w . x), a learned gate "
                           "(Qwen2-MoE); false = ungated"] = False
    router: Doc[Literal["softmax", "sigmoid"], "router score function"] = "softmax"
    norm_topk_prob: Doc[bool, "renormalise the top-k gates to sum 1 (Mixtral, Qwen3-MoE); false = the router's "
                              "probabilities as they are (Qwen2-MoE)"] = True
    noise_std: Doc[float, "noise added to router logits during training (noisy top-k); 0 = off"] = 0.0
    aux_loss_coef: Doc[float, "weight of the load-balancing loss"] = 0.01
    z_loss_coef: Doc[float, "weight of the router z-loss"] = 0.001
    impl: Doc[Literal["dropping", "dropless"], "dropping: fixed expert capacity; dropless: every token"] = "dropless"
    capacity_factor: Doc[float, "dropping: expert capacity as a multiple of the fair share"] = 1.25


@dataclass
class MeshConfig:
    """Mesh axis sizes within a host/slice (ici) and across hosts (dcn); -1 fills."""

    data: Doc[int, "data-parallel size within a host/slice; -1 = fill with the remaining devices"] = -1
    fsdp: Doc[int, "fully-sharded data-parallel size within a host/slice"] = 1
    expert: Doc[int, "expert-parallel size within a host/slice"] = 1
    tensor: Doc[int, "tensor-parallel size within a host/slice"] = 1
    dcn_data: Doc[int, "data-parallel size across hosts/slices"] = 1
    dcn_fsdp: Doc[int, "fsdp size across hosts/slices"] = 1
    dcn_expert: Doc[int, "expert-parallel size across hosts/slices"] = 1
    dcn_tensor: Doc[int, "tensor-parallel size across hosts/slices"] = 1
    rules: Doc[dict[str, Any], "logical axis -> mesh axis, list of axes or null; merged over the defaults, "
               "e.g. '{embed: null}'"] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: Doc[Literal["adamw", "lion", "adafactor", "muon", "sgd"],
              "optimizer (optax): muon orthogonalises the hidden matrices' updates and runs AdamW on embeddings, "
              "the output head and norm gains"] = "adamw"
    lr: Doc[float, "peak learning rate (> 0)"] = 1e-3
    min_lr: Doc[float, "final learning rate of the cosine and WSD schedules"] = 1e-4
    schedule: Doc[Literal["cosine", "wsd", "constant"], "learning-rate schedule after warmup"] = "cosine"
    warmup_steps: Doc[int, "linear warmup from 0 to lr (>= 0)"] = 100
    decay_fraction: Doc[float, "WSD: final fraction of steps spent decaying"] = 0.2
    beta1: Doc[float, "AdamW and Lion first-moment decay (also muon's AdamW part), in [0, 1)"] = 0.9
    beta2: Doc[float, "AdamW second-moment decay, Lion's momentum decay (also muon's AdamW part), in [0, 1)"] = 0.95
    eps: Doc[float, "AdamW epsilon"] = 1e-8
    momentum: Doc[Optional[float], "sgd and muon momentum; null = the usual one (sgd 0.9, muon 0.95)"] = None
    weight_decay: Doc[float, "decoupled weight decay, scaled by the learning rate (sgd: L2 added to the gradient); "
                             "not on norm gains nor, by default, embeddings"] = 0.1
    decay_embeddings: Doc[bool, "also decay the embedding table"] = False
    clip_norm: Doc[float, "clip gradients to this global norm; 0 disables clipping"] = 1.0


@dataclass
class SourceConfig:
    path: Doc[str, "a text file, directory, glob or prepared corpus"] = ""
    weight: Doc[float, "share of the training rows drawn from this source (> 0)"] = 1.0


@dataclass
class DataConfig:
    path: Doc[Optional[str], "text, .jsonl, .parquet (.gz/.zst compressed text and JSONL too), a directory "
              "(recursive) or glob of them, a saved Hugging Face dataset, or a directory made by `jaxlm prepare`; "
              "null = the embedded default corpus"] = None
    mixture: Doc[list[SourceConfig], "several sources with weights, [{path, weight}, ...] (instead of path)"] = \
        field(default_factory=list)
    packing: Doc[bool, "pack whole documents into rows (segment ids, positions restart) vs plain windows"] = False
    tokenizer: Doc[str, "'bytes', a tokenizer directory, a Hugging Face tokenizer.json (or a model directory "
                   "holding one), or a tiktoken encoding name"] = "bytes"
    text_field: Doc[str, "the field (JSONL) or column (parquet, saved datasets) that holds each document"] = "text"
    seq_len: Doc[int, "tokens per training row"] = 128
    val_fraction: Doc[float, "share of raw text held out for evaluation (prepared data has its own split)"] = 0.05
    seed: Doc[int, "seed of the row shuffle"] = 0
    chat_template: Doc[Optional[str], "sft/dpo: a Jinja chat template (Hugging Face semantics), as a file or the "
                       "template itself; null = the tokenizer's own, else a ChatML-like default"] = None


@dataclass
class ProfileConfig:
    """A jax.profiler trace of a few steps into RUN_DIR/profile (TensorBoard's profile tab, Perfetto)."""

    start_step: Doc[int, "trace the steps after this one (step 1 compiles, so start later)"] = 5
    steps: Doc[int, "how many steps to trace; 0 = no trace"] = 0


@dataclass
class WandbConfig:
    """Weights & Biases, beside metrics.jsonl and TensorBoard (pip install -e '.[wandb]')."""

    project: Doc[Optional[str], "the wandb project; null = no wandb"] = None
    name: Doc[Optional[str], "the run's name; null = the run directory's name"] = None
    mode: Doc[Literal["online", "offline", "disabled"],
              "offline: write RUN_DIR/wandb only (no network; `wandb sync` uploads later)"] = "online"


@dataclass
class TrainConfig:
    steps: Doc[int, "total optimizer steps (raise it to continue a finished run)"] = 300
    global_batch: Doc[int, "rows per step over all devices"] = 16
    microbatches: Doc[int, "gradient accumulation: global_batch is split into this many microbatches"] = 1
    seed: Doc[int, "seed of initialization and of training randomness"] = 0
    eval_every: Doc[int, "steps between evaluations (and one at the last step); 0 = off"] = 100
    eval_batches: Doc[int, "global batches of validation data per evaluation"] = 4
    log_every: Doc[int, "steps between metric records (>= 1)"] = 10
    run_dir: Doc[str, "metrics, TensorBoard events and checkpoints; from a config file: runs/<file name> "
                 "unless set"] = "runs/default"
    peak_flops_per_device: Doc[float, "for MFU; 0 = measure a matmul on this machine"] = 0.0
    z_loss_coef: Doc[float, "weight of the output z-loss (log-partition squared)"] = 0.0
    objective: Doc[Literal["next_token", "mdlm", "distill", "sft", "dpo", "grpo"],
                   "what the step minimises (jaxlm/objectives/): sft trains on chat records' assistant tokens, "
                   "dpo on preference records, grpo on rewarded rollouts (`jaxlm rl`)"] = "next_token"
    teacher: Doc[Optional[str], "distill: the teacher's run directory (its newest valid checkpoint)"] = None
    deterministic: Doc[Literal["auto", True, False],
                       "bit-exact runs and resumes; auto: where free (CPU, TPU), not on GPU"] = "auto"
    progress: Doc[bool, "show a progress bar"] = True
    early_stop_patience: Doc[int, "stop after this many evaluations without a new best eval loss; 0 = never"] = 0
    allow_data_change: Doc[bool, "resume even though the data files changed since the checkpoint"] = False
    init_from: Doc[Optional[str], "a Hugging Face model directory (Llama, Mistral, Mixtral, Qwen2/3, "
                   "Qwen2/3-MoE) or a jaxlm run directory whose weights start the run when run_dir has no "
                   "checkpoint"] = None
    init_from_step: Doc[Optional[Any], "with a jaxlm run in train.init_from: its step N or 'best' (lowest eval "
                        "loss); null = its newest valid checkpoint"] = None
    freeze: Doc[list[str], "parameters not trained: regular expressions searched in their paths (e.g. "
                "'embed/', 'lm_head'); `jaxlm accounting` lists the paths"] = field(default_factory=list)
    freeze_layers: Doc[int, "the first N transformer layers are not trained"] = 0
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DiffusionConfig:
    """Masked diffusion (train.objective=mdlm): the noise schedule and the ELBO evaluation."""

    schedule: Doc[Literal["linear", "loglinear", "cosine"], "alpha_t: 1 - t, MDLM's log-linear (1 - (1 - 1e-3) t), "
                  "or cos(pi t / 2)"] = "linear"
    t_min: Doc[float, "t ~ U(t_min, 1): keeps the 1/t weight of the ELBO finite"] = 1e-3
    low_discrepancy: Doc[bool, "t stratified across the batch (else i.i.d.)"] = True
    eval_t_samples: Doc[int, "t per validation sequence for the ELBO bound (seeded, evenly spread)"] = 4


@dataclass
class DistillConfig:
    """Distillation (train.objective=distill): weight * tau^2 * KL(teacher || student) at
    temperature tau + (1 - weight) * next-token cross-entropy."""

    temperature: Doc[float, "tau: both distributions are softened by it in the KL term"] = 2.0
    weight: Doc[float, "share of the KL term; 1 - weight goes to the next-token loss"] = 0.5


@dataclass
class LoraConfig:
    """Low-rank adapters: each targeted projection computes W x + (alpha / rank) B A x with A [rank x in]
    (normal) and B [out x rank] (zero) trained, everything else frozen (QLoRA: held in int8)."""

    rank: Doc[int, "adapter rank; 0 = no adapters"] = 0
    alpha: Doc[float, "the update is scaled by alpha / rank"] = 16.0
    dropout: Doc[float, "dropout on the adapters' input (training only)"] = 0.0
    targets: Doc[list[str], "projections that get adapters: q, k, v, o (attention), gate, up, down (dense and "
                 "shared-expert MLPs)"] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    experts: Doc[bool, "also adapt the routed experts' gate, up and down (MoE)"] = False
    quantize: Doc[Literal["none", "int8", "int4-g32", "int4-g64", "int4-g128"],
                  "QLoRA: hold the frozen base's matrices quantized (jaxlm/compress: int8 per channel, or 4-bit "
                  "with a scale per group of 32/64/128 inputs), dequantized in the matmul"] = "none"
    trainable_tokens: Doc[list[int], "token ids whose rows of the input embedding and the output head are trained "
                          "beside the adapters (peft's trainable_token_indices): tokens the base barely saw, e.g. "
                          "digits or new special tokens; counted in the trained parameters"] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class DPOConfig:
    """Direct preference optimisation (train.objective=dpo) against the frozen starting policy."""

    beta: Doc[float, "strength of the implicit KL to the reference: reward = beta * log(policy / reference)"] = 0.1


@dataclass
class PruneConfig:
    """Pruning (jaxlm/compress/prune.py). Unstructured methods keep a mask per pruned matrix, applied
    after every optimizer update, so pruned weights stay exactly zero; structured ones (`jaxlm prune`
    only) remove FFN channels or attention heads and give a smaller model config."""

    method: Doc[Literal["none", "magnitude", "nm", "ffn", "heads"],
                "magnitude: the smallest |w|; nm: keep n of every m along the input dimension; ffn / heads: "
                "remove FFN channels / attention heads (kv groups) by their norm (jaxlm prune only)"] = "none"
    scope: Doc[Literal["layer", "global"], "magnitude: rank weights within each matrix of each layer, or across "
                                           "every pruned matrix together"] = "layer"
    sparsity: Doc[float, "magnitude: final share of weights set to zero; ffn/heads: share of channels/heads "
                         "removed, in [0, 1)"] = 0.5
    n: Doc[int, "nm: weights kept in each group"] = 2
    m: Doc[int, "nm: group size along the input dimension (2:4 and 4:8 suit sparse tensor cores)"] = 4
    norm: Doc[Literal["l1", "l2"], "ffn/heads: the norm that scores a channel or head"] = "l2"
    targets: Doc[list[str], "matrices pruned: q, k, v, o (attention), gate, up, down (dense and shared-expert "
                 "MLPs)"] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    start_step: Doc[int, "the (first) step after which masks are computed; 0 = at initialisation (a run written "
                         "by jaxlm prune has its masks already)"] = 0
    end_step: Doc[int, "gradual: the step that reaches `sparsity` (cubic schedule from start_step)"] = 0
    every: Doc[int, "gradual: steps between mask updates; 0 = one-shot at start_step"] = 0
    initial_sparsity: Doc[float, "gradual: the sparsity at start_step"] = 0.0

    @property
    def masked(self) -> bool:
        """Whether training holds masks (the unstructured methods)."""
        return self.method in ("magnitude", "nm")


@dataclass
class RewardConfig:
    fn: Doc[str, "a built-in (answer: the extracted answer equals the record's; format: the completion matches "
                 "grpo.format_pattern; length: minus the completion's share of grpo.max_new_tokens) or "
                 "'module:function' called as fn(prompts, completions, **columns) -> list[float]"] = "answer"
    weight: Doc[float, "the reward is the weighted sum of the functions' rewards"] = 1.0


@dataclass
class GRPOConfig:
    """Group relative policy optimisation (train.objective=grpo, run by `jaxlm rl`): rollouts from
    the current policy, rewards from functions, a clipped policy-gradient step with KL to the start."""

    group_size: Doc[int, "completions sampled per prompt (>= 2); train.global_batch = prompts_per_step * this"] = 8
    prompts_per_step: Doc[int, "prompts per rollout batch"] = 4
    max_new_tokens: Doc[int, "completion length limit (tokens); a completion also ends at end-of-text"] = 32
    temperature: Doc[float, "sampling temperature of the rollouts (> 0); the loss scores the same distribution"] = 1.0
    top_p: Doc[float, "nucleus sampling of the rollouts, in (0, 1]"] = 1.0
    mu: Doc[int, "optimizer steps per rollout batch (GRPO's mu, >= 1): old log-probs are computed once per batch"] = 1
    clip_low: Doc[float, "epsilon low: the ratio is clipped below at 1 - this"] = 0.2
    clip_high: Doc[float, "epsilon high: the ratio is clipped above at 1 + this (DAPO: 0.28)"] = 0.2
    beta: Doc[float, "weight of the KL to the reference (k3 estimator); 0 = no reference is kept"] = 0.04
    advantage: Doc[Literal["std", "none"], "std: (r - group mean) / (group std + 1e-4); none: r - group mean "
                   "(Dr. GRPO)"] = "std"
    rewards: Doc[list[RewardConfig], "reward functions, summed with weights"] = \
        field(default_factory=lambda: [RewardConfig()])
    answer_pattern: Doc[str, "answer: the regex whose last match (its first group if it has one) is the "
                        "completion's answer"] = r"-?\d+"
    answer_column: Doc[str, "answer: the record's column holding the right answer"] = "answer"
    format_pattern: Doc[str, "format: the regex a whole completion must match (re.fullmatch) for reward 1"] = \
        r"\s*-?\d+\s*"


@dataclass
class CheckpointConfig:
    every: Doc[int, "steps between checkpoints (and one at the last step); 0 disables checkpoints"] = 1000
    keep: Doc[int, "newest checkpoints to keep (>= 1)"] = 3
    keep_every: Doc[int, "also keep every n-th step forever; 0 = none"] = 0
    keep_best: Doc[int, "also keep the n checkpoints with the lowest eval loss (saved at eval steps); 0 = none"] = 0
    async_save: Doc[bool, "write checkpoints in the background while training goes on"] = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
