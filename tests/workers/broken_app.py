"""A WSGI app module that fails at import, as a plugin with a syntax slip would."""
raise RuntimeError("broken_app fails at import on purpose")
