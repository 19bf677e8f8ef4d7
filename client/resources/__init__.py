"""The API's resource groups, each as a sync and an async class with the same methods."""

from client.resources.adapters import Adapters, AsyncAdapters
from client.resources.chat import AsyncChat, AsyncChatCompletions, Chat, ChatCompletions
from client.resources.completions import AsyncCompletions, Completions
from client.resources.files import AsyncFiles, Files
from client.resources.fine_tuning import AsyncFineTuning, AsyncJobs, FineTuning, Jobs
from client.resources.models import AsyncModels, Models

__all__ = [
    "Adapters",
    "AsyncAdapters",
    "AsyncChat",
    "AsyncChatCompletions",
    "AsyncCompletions",
    "AsyncFiles",
    "AsyncFineTuning",
    "AsyncJobs",
    "AsyncModels",
    "Chat",
    "ChatCompletions",
    "Completions",
    "Files",
    "FineTuning",
    "Jobs",
    "Models",
]
