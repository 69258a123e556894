"""raytp: elastic tensor-parallel LLM serving on Ray."""
from raytp.sampling import SamplingParams
from raytp.outputs import CompletionOutput, RequestOutput
from raytp.engine.structured import StructuredOutputs

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in Ray and the engine; import it only when asked for.
    if name == "LLM":
        from raytp.llm import LLM

        return LLM
    raise AttributeError(name)
