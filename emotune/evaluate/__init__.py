"""Evaluation: activation shift, concealment, behaviour, capability, steering, report.

``emotune.evaluate.run.evaluate(model_name, adapter=..., out=...)`` is the entry point; the
``emotune eval`` command calls it.
"""
