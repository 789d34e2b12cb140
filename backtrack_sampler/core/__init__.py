"""The driver: one generation's sampling and rewind logic (``Generation``), the one scheduler that
steps it on any backend, the ``BacktrackSampler`` facade, continuous batching and the event view."""
