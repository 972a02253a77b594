"""Names of record entries, config entries and state entries: one place, no string typos."""

# Per-round config sent by the server with each instruction.
SERVER_ROUND = "server-round"
CLIENT_LR = "client-lr"
LOCAL_EPOCHS = "local-epochs"
PHASE = "phase"  # evaluation phase: "valid" or "test"
CLIP_NORM = "clip-norm"  # DP: L2 bound the client applies to its whole update before sending
BIAS_SHARE = "bias-share"  # DP: share of the clip norm² given to the item biases (≤ 0: flat)

# Properties a client reports once (a pseudonymous id: which partition/device it is).
PROP_QUERY = "fedrec-identity"
PROP_CLIENT_ID = "client-id"

# Metrics a client returns after training / evaluation (all plaintext, even under SecAgg+).
M_TRAIN_LOSS = "train-loss"
M_USERS = "users"
M_FAILED = "failed"

# node_config keys
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_PATH = "data-path"

# context.state keys (kept on the node, never sent)
STATE_USER_VECTORS = "fedrec.user-vectors"

# Names of the global parameter arrays, in the order they travel.
ITEM_PARAM_NAMES = ("item_embeddings", "item_bias")
