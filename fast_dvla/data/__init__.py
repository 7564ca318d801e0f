"""The demonstration dataset format (see :mod:`fast_dvla.data.episodes`)."""
from .episodes import (EpisodeError, episode_path, list_episodes, read_dataset_info, read_episode,
                       validate_episode, write_dataset_info, write_episode)

__all__ = ["EpisodeError", "episode_path", "list_episodes", "read_dataset_info", "read_episode",
           "validate_episode", "write_dataset_info", "write_episode"]
