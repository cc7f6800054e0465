"""The parallel runtime: process start-up (`launch`), the device mesh (`mesh`), logical-axis sharding
rules (`sharding`), determinism flags (`determinism`) and which backends are present (`backends`)."""
