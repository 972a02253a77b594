"""Names of record entries, config entries and state entries: one place, no string typos."""

# Per-round config sent by the server with each instruction.
SERVER_ROUND = "server-round"
CLIENT_LR = "client-lr"
LOCAL_EPOCHS = "local-epochs"
PHASE = "phase"  # evaluation phase: "valid" or "test"
CLIP_NORM = "clip-norm"  # DP: L2 bound the client applies to its whole update before sending
BIAS_SHARE = "bias-share"  # DP: share of the clip norm² given to the item biases (≤ 0: flat)
LOCAL_NOISE = "local-noise"  # local DP: σ; the device adds N(0, (σ·clip)²) to its clipped update
# Distributed DP: this round's mechanism as JSON (grid step, the device's integer noise variance, the
# survivors it is sized for, field bits, dimension, β, the public rotation seed); see common/ddp_round.py.
DISTRIBUTED = "distributed-dp"

# Properties a client reports once (a pseudonymous id: which partition/device it is).
PROP_QUERY = "fedrec-identity"
PROP_CLIENT_ID = "client-id"
PROP_USERS = "users"  # how many users the client holds (1 on a device): bounds its evaluation sums

# Metrics a client returns after training / evaluation (all plaintext, even under SecAgg+).
M_TRAIN_LOSS = "train-loss"
M_USERS = "users"
# Silo DP-SGD: this round's Opacus history entry (σ, q, steps), functions of public settings; the
# server composes each silo's ε from them and keeps them with its checkpoint.
M_SILO_SIGMA = "silo-sigma"
M_SILO_RATE = "silo-rate"
M_SILO_STEPS = "silo-steps"

# node_config keys
NODE_PARTITION_ID = "partition-id"
NODE_DATA_PATH = "data-path"

# context.state keys (kept on the node, never sent)
STATE_USER_VECTORS = "fedrec.user-vectors"
STATE_DPSGD_HISTORY = "fedrec.dpsgd-history"  # Opacus accountant history, restored every round
STATE_LOCAL_LEDGER = "fedrec.local-ledger"  # local DP: this device's own ledger of what it sent

# Names of the global parameter arrays, in the order they travel.
ITEM_PARAM_NAMES = ("item_embeddings", "item_bias")

# Hybrid model (model.kind = "hybrid", common/models/hybrid/). The trainable arrays travel as
# ITEM_PARAM_NAMES + ("head.weight", "head.bias", sorted "lora.*"); after them the server appends
# one NON-trainable context array, the item text vectors head(encoder(texts)) it computed from
# the released adapter. The fit config says how many leading arrays are trainable and names the
# context array; clients send an update for the trainable ones only.
TRAINABLE_ARRAYS = "trainable-arrays"  # fit config: number of leading trainable arrays
CONTEXT_ARRAYS = "context-arrays"  # fit config: names of the trailing non-trainable arrays
TEXT_VECTORS_NAME = "item_text_vectors"

# Every key a fit/evaluate instruction may carry. A device refuses an instruction with any other
# key (common/privacy/device.py): the server cannot slip it a noise seed or another privacy knob.
INSTRUCTION_KEYS = (SERVER_ROUND, CLIENT_LR, LOCAL_EPOCHS, PHASE, CLIP_NORM, BIAS_SHARE, LOCAL_NOISE, DISTRIBUTED,
                    TRAINABLE_ARRAYS, CONTEXT_ARRAYS)
M_TEXT_LOSS = "text-loss"  # hybrid: the head/LoRA step's sampled-softmax loss
