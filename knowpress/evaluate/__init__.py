"""Evaluation: tasks scored through a runtime, retention against the teacher, the gate.

Import the submodules (``evaluator``, ``tasks``, ``lm_eval_bridge``); the package itself
imports nothing, so reading a recipe does not pull in torch.
"""
