"""Evaluation: activation shift, concealment, behaviour, capability, steering, report."""
