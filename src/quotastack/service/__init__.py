"""Use cases, one verb each. Every mutating use case runs inside one store transaction."""
