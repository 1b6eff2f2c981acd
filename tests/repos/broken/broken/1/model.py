"""A model whose initialize fails, as a model with a missing engine folder would."""


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("engine folder /nonexistent/engine is missing engine.json")

    def execute(self, requests):
        return []
