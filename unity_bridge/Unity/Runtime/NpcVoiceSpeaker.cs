// NpcVoiceSpeaker: a Unity component that records the player's question from the Microphone, asks an NPC over the
// npc-voice bridge, and plays the streamed answer through a ring buffer read in OnAudioFilterRead.
using System;
using System.Collections.Concurrent;
using System.Text;
using System.Threading.Tasks;
using UnityEngine;
using UnityEngine.Events;

namespace NpcVoice
{
    /// <summary>Raised with the whole subtitle so far each time the NPC's answer text grows.</summary>
    [Serializable] public class SubtitleEvent : UnityEvent<string> { }

    /// <summary>Raised when the answer has finished playing: its full text and whether it was interrupted.</summary>
    [Serializable] public class AnswerFinishedEvent : UnityEvent<string, bool> { }

    /// <summary>Raised when the NPC's mouth takes a new shape: the viseme (sil PP FF TH DD kk CH SS nn RR aa E I O U) and
    /// how long it holds, in seconds. Drive a face rig's blend shapes from it.</summary>
    [Serializable] public class VisemeEvent : UnityEvent<string, float> { }

    /// <summary>Raised when the NPC starts saying a word: the word and how long it lasts, in seconds.</summary>
    [Serializable] public class WordEvent : UnityEvent<string, float> { }

    /// <summary>Raised on a server or connection error: code (e.g. NOT_FOUND) and a readable message.</summary>
    [Serializable] public class NpcErrorEvent : UnityEvent<string, string> { }

    /// <summary>
    /// Put this on the NPC's GameObject (it needs an AudioSource; make it 3D for positional voice). Call
    /// <see cref="StartListening"/> when the player starts talking (push-to-talk down) and <see cref="StopListening"/>
    /// when they stop; audio is streamed to the server while recording, so the answer starts right after.
    /// UnityEvents are raised on the main thread.
    /// </summary>
    [RequireComponent(typeof(AudioSource))]
    public class NpcVoiceSpeaker : MonoBehaviour
    {
        [Header("Server")]
        public string serverUrl = "ws://127.0.0.1:8765";
        [Tooltip("The server's shared token (npc-server serve --token / NPC_VOICE_TOKEN)")]
        public string token = "";
        public string clientId = "";

        [Header("NPC")]
        public string npcId = "innkeeper";
        [Tooltip("Keep one conversation (server session) so the NPC remembers earlier questions")]
        public bool keepConversation = true;
        [Tooltip("Optional emotion override, e.g. happy; empty = the persona's default")]
        public string emotion = "";

        [Header("Microphone")]
        [Tooltip("Empty = the default device")]
        public string microphoneDevice = "";
        public int microphoneSampleRate = 16000;
        [Tooltip("Longest question; recording stops by itself after this")]
        public int maxQuestionSeconds = 15;

        [Header("Lip sync")]
        [Tooltip("Ask the server for viseme and word timings (model v2 servers) and raise onViseme / onWord as the answer plays")]
        public bool lipSync = true;

        [Header("Events")]
        public SubtitleEvent onSubtitle = new SubtitleEvent();
        public VisemeEvent onViseme = new VisemeEvent();
        public WordEvent onWord = new WordEvent();
        public AnswerFinishedEvent onAnswerFinished = new AnswerFinishedEvent();
        public NpcErrorEvent onError = new NpcErrorEvent();

        readonly ConcurrentQueue<Action> mainThread = new ConcurrentQueue<Action>();
        readonly PcmRingBuffer ring = new PcmRingBuffer();
        readonly LipSyncTimeline lips = new LipSyncTimeline();
        readonly StringBuilder subtitle = new StringBuilder();
        NpcVoiceClient client;
        AudioSource source;
        int outputRate;
        string sessionId = "";
        volatile Speech current;
        AnswerEnd pendingEnd;
        AudioClip micClip;
        int micReadPos;
        int micSamplesSent;
        bool listening;

        public bool IsConnected { get { return client != null && client.IsConnected; } }
        public bool IsListening { get { return listening; } }
        /// <summary>True while an answer is streaming or still playing.</summary>
        public bool IsSpeaking { get { return (current != null && !current.IsDone) || ring.Count > 0; } }

        async void Start()
        {
            source = GetComponent<AudioSource>();
            outputRate = AudioSettings.outputSampleRate;  // read here: AudioSettings is main-thread only
            // A looping clip of constant 1.0 keeps the AudioSource (and so OnAudioFilterRead) running; what reaches the
            // filter is then the source's per-channel gain (volume, 3D attenuation and panning), which we multiply by
            // the voice, so the NPC's voice stays positional.
            var ones = new float[outputRate];
            for (int i = 0; i < ones.Length; i++) ones[i] = 1f;
            source.clip = AudioClip.Create("npc-voice-stream", outputRate, 1, outputRate, false);
            source.clip.SetData(ones, 0);
            source.loop = true;
            source.Play();
            try
            {
                await ConnectAsync();
            }
            catch (Exception exc)
            {
                Report(exc);
            }
        }

        /// <summary>Connect (Start does this) and, with keepConversation, open a session with the NPC.</summary>
        public async Task ConnectAsync()
        {
            if (client != null) client.Dispose();
            client = new NpcVoiceClient();
            client.Error += e => Post(() => onError.Invoke(e.Code, e.Detail));
            await client.ConnectAsync(new Uri(serverUrl), string.IsNullOrEmpty(token) ? null : token,
                                      string.IsNullOrEmpty(clientId) ? null : clientId);
            sessionId = keepConversation ? await client.OpenSessionAsync(npcId) : "";
            Debug.Log("npc-voice: connected to " + client.Welcome.Server + " (" + client.Welcome.Model + ")");
        }

        /// <summary>The player starts talking: interrupt the NPC if it is speaking, record and stream the question.</summary>
        public async void StartListening()
        {
            if (!IsConnected) { Debug.LogWarning("npc-voice: not connected"); return; }
            if (listening) return;
            double? heard = Interrupt();
            string device = string.IsNullOrEmpty(microphoneDevice) ? null : microphoneDevice;
            micClip = Microphone.Start(device, true, maxQuestionSeconds + 1, microphoneSampleRate);
            if (micClip == null) { onError.Invoke("FAILED_PRECONDITION", "no microphone"); return; }
            micReadPos = 0;
            micSamplesSent = 0;
            listening = true;
            try
            {
                await Ask(new SpeakConfig { SampleRate = micClip.frequency, Channels = micClip.channels, HeardSeconds = heard }, null);
            }
            catch (Exception exc)
            {
                Report(exc);
            }
        }

        /// <summary>The player stopped talking: send the rest of the recording; the answer starts now.</summary>
        public void StopListening()
        {
            if (!listening) return;
            SendNewMicrophoneSamples();
            Microphone.End(string.IsNullOrEmpty(microphoneDevice) ? null : microphoneDevice);
            listening = false;
            var speech = current;
            if (speech != null) Forget(speech.EndAudioAsync());
        }

        /// <summary>Ask with typed text instead of the microphone.</summary>
        public async void AskText(string text)
        {
            if (!IsConnected) { Debug.LogWarning("npc-voice: not connected"); return; }
            double? heard = Interrupt();
            try
            {
                var speech = await Ask(new SpeakConfig { Text = text, HeardSeconds = heard }, null);
                await speech.EndAudioAsync();
            }
            catch (Exception exc)
            {
                Report(exc);
            }
        }

        /// <summary>Interrupt the NPC: the audio stops now; the server keeps only what was heard in the history.</summary>
        public void Cancel()
        {
            var speech = current;
            current = null;
            ring.Clear();
            lips.Clear();
            if (speech != null && !speech.IsDone) Forget(speech.CancelAsync());
            pendingEnd = null;
        }

        /// <summary>
        /// The player speaks again: silence the NPC now. In a conversation the new question itself stops the answer
        /// on the server (barge-in) and the conversation keeps what the player heard (returned, in seconds); without
        /// one the answer is cancelled (null).
        /// </summary>
        double? Interrupt()
        {
            var speech = current;
            bool streaming = speech != null && !speech.IsDone;
            double? heard = streaming && !string.IsNullOrEmpty(sessionId) ? ring.PlayedSeconds : (double?)null;
            if (streaming && heard == null) Forget(speech.CancelAsync());
            current = null;
            ring.Clear();
            lips.Clear();
            pendingEnd = null;
            return heard;
        }

        async Task<Speech> Ask(SpeakConfig cfg, byte[] audio)
        {
            cfg.NpcId = npcId;
            cfg.SessionId = sessionId;
            if (!string.IsNullOrEmpty(emotion)) cfg.Emotion = emotion;
            cfg.LipSync = lipSync;
            subtitle.Length = 0;
            pendingEnd = null;
            return await client.StartSpeakAsync(cfg, s =>
            {
                current = s;
                s.Text += t => Post(() =>
                {
                    if (current != s) return;
                    subtitle.Append(t);
                    onSubtitle.Invoke(subtitle.ToString());
                });
                s.Viseme += v => { if (current == s) lips.Add(v); };  // network thread: timed in Update
                s.Word += w => { if (current == s) lips.Add(w); };
                s.Audio += (pcm, rate, seq) =>  // network thread: straight into the ring buffer
                {
                    if (current != s) return;
                    if (seq == 0) ring.SourceRate = rate;
                    ring.WritePcm16(pcm, 0, pcm.Length);
                };
                s.End += end =>
                {
                    if (current != s) return;
                    ring.Complete();
                    Post(() => { if (current == s) pendingEnd = end; });
                };
                s.Error += e => Post(() => onError.Invoke(e.Code, e.Detail));
            });
        }

        void Update()
        {
            Action action;
            while (mainThread.TryDequeue(out action)) action();
            if (listening)
            {
                SendNewMicrophoneSamples();
                if (micSamplesSent >= maxQuestionSeconds * micClip.frequency) StopListening();
            }
            if (lips.Pending > 0)  // mouth shapes and words whose time in the answer's audio has come
            {
                double playedMs = ring.PlayedSeconds * 1000.0;
                foreach (var v in lips.DueVisemes(playedMs)) onViseme.Invoke(v.Viseme, (float)(v.DurationMs / 1000.0));
                foreach (var w in lips.DueWords(playedMs)) onWord.Invoke(w.Text, (float)((w.EndMs - w.StartMs) / 1000.0));
            }
            if (pendingEnd != null && ring.Count == 0)  // the answer has been heard to the end
            {
                var end = pendingEnd;
                pendingEnd = null;
                onAnswerFinished.Invoke(end.Text, end.Interrupted);
            }
        }

        void SendNewMicrophoneSamples()
        {
            var speech = current;
            if (micClip == null || speech == null) return;
            int pos = Microphone.GetPosition(string.IsNullOrEmpty(microphoneDevice) ? null : microphoneDevice);
            int total = micClip.samples;
            int n = (pos - micReadPos + total) % total;
            if (n == 0) return;
            var samples = new float[n * micClip.channels];
            int first = Math.Min(n, total - micReadPos);
            var part = new float[first * micClip.channels];
            micClip.GetData(part, micReadPos);
            Array.Copy(part, samples, part.Length);
            if (first < n)
            {
                var rest = new float[(n - first) * micClip.channels];
                micClip.GetData(rest, 0);
                Array.Copy(rest, 0, samples, part.Length, rest.Length);
            }
            micReadPos = pos;
            micSamplesSent += n;
            byte[] pcm = NpcVoiceClient.FloatToPcm16(samples, 0, samples.Length);
            Forget(speech.SendAudioAsync(pcm, 0, pcm.Length));
        }

        float[] voice = new float[0];

        // audio thread: data holds the source's gains (see Start); replace them with gain * voice
        void OnAudioFilterRead(float[] data, int channels)
        {
            if (voice.Length < data.Length) voice = new float[data.Length];  // once; no allocation per callback after
            ring.Read(voice, data.Length / channels, channels, outputRate);
            for (int i = 0; i < data.Length; i++) data[i] *= voice[i];
        }

        void OnDestroy()
        {
            if (listening) Microphone.End(string.IsNullOrEmpty(microphoneDevice) ? null : microphoneDevice);
            Cancel();
            if (client != null) client.Dispose();
        }

        void Post(Action action) { mainThread.Enqueue(action); }

        void Report(Exception exc)
        {
            var npc = exc as NpcVoiceException;
            if (npc != null) onError.Invoke(npc.Code, npc.Detail);
            else onError.Invoke("UNAVAILABLE", exc.Message);
            Debug.LogError("npc-voice: " + exc.Message);
        }

        void Forget(Task task)
        {
            task.ContinueWith(t => Post(() => Report(t.Exception.GetBaseException())), TaskContinuationOptions.OnlyOnFaulted);
        }
    }
}
