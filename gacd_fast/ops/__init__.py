"""Op implementations: ``reference`` (the definition), and one module per backend."""
