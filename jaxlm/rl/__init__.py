"""Reinforcement learning with verifiable rewards: GRPO's rollouts, rewards and run (`jaxlm rl`).

Above inference (it samples with the KV-cache decoder) and training (it drives the train step);
the loss itself is an ordinary objective, `jaxlm/objectives/grpo.py`.
"""
