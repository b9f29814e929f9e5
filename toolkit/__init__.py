"""LLM optimization and model-compilation toolkit.

Subpackages: ``toolkit.passes`` (folder ``passes/``) holds one file per pass; ``toolkit.runtime``
(folder ``runtime/``) loads exports and generates.
"""

__version__ = "0.1.0"
