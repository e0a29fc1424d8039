"""Data pipeline: files -> records -> mapped examples -> template text -> tokens with loss masks.

Modules: ``files`` (read records with line-numbered errors), ``schema`` (detect and map columns),
``templates`` (one formatting function for training and inference), ``tokenize`` (ids, labels,
per-token loss mask), ``stats`` (token length statistics), ``pipeline`` (split and the whole path).
"""

from studio.data.files import DataError, read_records  # noqa: F401
