"""Agentic evaluation (the ``generation`` section of ``emotune eval``): sampled coding tasks run in an OS
sandbox, blackmail replies judged by a detector, and the failure loop.

Imported only when the generation section is asked for. The sandbox needs bubblewrap (``bwrap``) on the
machine; ``pip install emotune[agentic]`` pulls no Python packages, the standard library suffices.
"""
