"""Training phases: state (optimizer, sharding, logging), pretrain, finetune, evaluate, inspect."""
