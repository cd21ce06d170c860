"""moegate: the gate of a Mixture of RAG experts (a DACT-BERT early-exit router) and the workflow that builds it."""

__version__ = "0.1.0"

__all__ = ["Router", "RouteResult"]


def __getattr__(name):  # lazy: importing moegate must not pull torch in for the data stages
    if name in ("Router", "RouteResult"):
        from moegate import router

        return getattr(router, name)
    raise AttributeError(name)
