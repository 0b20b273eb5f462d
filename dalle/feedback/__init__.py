"""Learning from human feedback (Stiennon et al. 2020, applied to text-to-image): people compare two
samples for one prompt, a reward model learns to predict their choice, and the transformer is tuned
against it with a KL penalty that keeps it near the supervised model.

store.py the comparisons (SQLite); raters.py simulated raters for experiments and tests; losses.py the
Bradley-Terry, DPO and KL-penalised reward terms; reward.py the reward model (pure model code); data.py
comparisons as training data, held-out splits and pairwise accuracy; evaluate.py the reward model against
the raw reranker and the noise ceiling; policy_eval.py the tuned policies against best-of-N, judged by the
shapes detector, with their KL and diversity. Their training tasks live in dalle.train.tasks (reward, dpo,
grpo). Above the model packages, beside dalle.train.
"""
