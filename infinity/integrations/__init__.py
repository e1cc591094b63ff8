"""Integrations with other libraries (Transformers).  Each subpackage imports its library lazily or on import;
nothing below this layer imports from here."""
