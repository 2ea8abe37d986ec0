"""Corpus-scale embedding on Ray Data (the ``distributed`` extra). Importing ``jv5fast`` never imports Ray."""
