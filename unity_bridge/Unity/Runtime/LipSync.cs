// LipSync: the mouth shapes and word timings of an answer (the bridge's `lip_sync` frames), and a timeline that
// gives them out as the answer's audio plays. No UnityEngine dependency.
using System;
using System.Collections.Generic;

namespace NpcVoice
{
    /// <summary>
    /// A mouth shape from StartMs for DurationMs, in milliseconds from the answer's first audio sample. Viseme is one
    /// of the Oculus / Meta lip-sync set: sil PP FF TH DD kk CH SS nn RR aa E I O U.
    /// </summary>
    public sealed class VisemeTiming
    {
        public string Viseme;
        public double StartMs;
        public double DurationMs;
    }

    /// <summary>A word of the subtitle (with its punctuation), spoken from StartMs to EndMs.</summary>
    public sealed class WordTiming
    {
        public string Text;
        public double StartMs;
        public double EndMs;
    }

    /// <summary>
    /// Timings waiting for their moment: the network thread adds them as they arrive (before the audio they describe),
    /// the main thread takes those whose start has been played. Thread-safe.
    /// </summary>
    public sealed class LipSyncTimeline
    {
        readonly object gate = new object();
        readonly Queue<VisemeTiming> visemes = new Queue<VisemeTiming>();
        readonly Queue<WordTiming> words = new Queue<WordTiming>();

        public void Add(VisemeTiming viseme)
        {
            if (viseme == null) throw new ArgumentNullException("viseme");
            lock (gate) visemes.Enqueue(viseme);
        }

        public void Add(WordTiming word)
        {
            if (word == null) throw new ArgumentNullException("word");
            lock (gate) words.Enqueue(word);
        }

        public void Clear()
        {
            lock (gate) { visemes.Clear(); words.Clear(); }
        }

        /// <summary>Timings not given out yet.</summary>
        public int Pending { get { lock (gate) return visemes.Count + words.Count; } }

        /// <summary>The visemes that start at or before <paramref name="playedMs"/> (the answer's audio played so far), in order.</summary>
        public List<VisemeTiming> DueVisemes(double playedMs)
        {
            var due = new List<VisemeTiming>();
            lock (gate)
                while (visemes.Count > 0 && visemes.Peek().StartMs <= playedMs) due.Add(visemes.Dequeue());
            return due;
        }

        /// <summary>The words that start at or before <paramref name="playedMs"/>, in order.</summary>
        public List<WordTiming> DueWords(double playedMs)
        {
            var due = new List<WordTiming>();
            lock (gate)
                while (words.Count > 0 && words.Peek().StartMs <= playedMs) due.Add(words.Dequeue());
            return due;
        }
    }
}
