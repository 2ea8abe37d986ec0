"""Adapters for the frameworks users already use (LangChain, LlamaIndex, MTEB); each needs its own extra and
is imported only when used."""
