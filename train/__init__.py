"""Training the built-in tiny model (``fluxrt train-tiny``): the shapes dataset, the recipe, the adherence check.
Needs the export extra; the runtime never imports it."""
