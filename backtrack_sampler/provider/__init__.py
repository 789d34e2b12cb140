"""Model backends. Import each from its own module: it needs its backend installed."""
