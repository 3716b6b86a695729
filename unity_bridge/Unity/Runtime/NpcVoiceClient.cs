// NpcVoiceClient: plain .NET client of the npc-voice WebSocket bridge (protocol v1), with no UnityEngine dependency.
using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Net.WebSockets;
using System.Threading;
using System.Threading.Tasks;

namespace NpcVoice
{
    /// <summary>An error frame from the server (code is a gRPC status name such as NOT_FOUND) or a transport failure.</summary>
    public sealed class NpcVoiceException : Exception
    {
        public NpcVoiceException(string code, string message) : base(code + ": " + message)
        {
            Code = code;
            Detail = message;
        }

        public string Code { get; private set; }
        public string Detail { get; private set; }
    }

    /// <summary>The server's answer to hello.</summary>
    public sealed class Welcome
    {
        public int Version;
        public string Server;
        public string Model;
        public int SampleRate;
    }

    /// <summary>What to ask: the `config` map of a speak frame (see unity_bridge/protocol.md).</summary>
    public sealed class SpeakConfig
    {
        public string NpcId = "";
        public string SessionId = "";
        /// <summary>"pcm_s16le" (then set SampleRate and Channels) or "wav" (a whole wav file's bytes).</summary>
        public string Encoding = "pcm_s16le";
        public int SampleRate = 16000;
        public int Channels = 1;
        public string Text = "";
        public string Emotion;
        public double? Speed;
        public double? PitchSemitones;
        public string Language;
        public string Accent;
        /// <summary>0 = the model's rate; else 8000, 16000, 22050, 24000, 32000, 44100 or 48000.</summary>
        public int OutputSampleRate;
        /// <summary>"audio_and_text", "text_only" or "audio_only".</summary>
        public string Mode = "audio_and_text";
        /// <summary>Also stream viseme and word timings (Speech.Viseme / Speech.Word; model v2 servers).</summary>
        public bool LipSync;
        /// <summary>Barge-in: a question on a session stops the session's answer in flight; the conversation keeps
        /// this many seconds of it (what the player heard). Null: all that was sent.</summary>
        public double? HeardSeconds;

        public Dictionary<string, object> ToMap()
        {
            var overrides = new Dictionary<string, object>();
            if (Emotion != null) overrides["emotion"] = Emotion;
            if (Speed.HasValue) overrides["speed"] = Speed.Value;
            if (PitchSemitones.HasValue) overrides["pitch"] = PitchSemitones.Value;
            if (Language != null) overrides["language"] = Language;
            if (Accent != null) overrides["accent"] = Accent;
            var map = new Dictionary<string, object>
            {
                { "npc_id", NpcId ?? "" }, { "session_id", SessionId ?? "" }, { "encoding", Encoding },
                { "sample_rate", SampleRate }, { "channels", Channels }, { "text", Text ?? "" },
                { "overrides", overrides }, { "output_sample_rate", OutputSampleRate }, { "mode", Mode },
            };
            if (LipSync) map["lip_sync"] = true;  // only when asked: a server older than the key refuses it
            if (HeardSeconds.HasValue) map["heard_seconds"] = HeardSeconds.Value;
            return map;
        }
    }

    /// <summary>The last frame of an answer.</summary>
    public sealed class AnswerEnd
    {
        public string SessionId;
        /// <summary>The full subtitle of what was spoken.</summary>
        public string Text;
        /// <summary>Duration of all audio frames the server sent for this answer.</summary>
        public double AudioSeconds;
        public bool Interrupted;
        /// <summary>time_to_first_audio_ms, total_ms, tokenize_ms, prefill_ms, decode_ms, vocoder_ms, prefill_tokens, generated_tokens.</summary>
        public Dictionary<string, double> Timings = new Dictionary<string, double>();
    }

    /// <summary>One question being answered. Events are raised on the client's receive thread.</summary>
    public sealed class Speech
    {
        readonly NpcVoiceClient client;
        readonly TaskCompletionSource<AnswerEnd> done = new TaskCompletionSource<AnswerEnd>();

        internal Speech(NpcVoiceClient client, long id)
        {
            this.client = client;
            Id = id;
        }

        public long Id { get; private set; }

        /// <summary>A subtitle delta: append it to what you have.</summary>
        public event Action<string> Text;

        /// <summary>A chunk of the answer: s16le mono PCM, its sample rate, its sequence number (from 0).</summary>
        public event Action<byte[], int, int> Audio;

        /// <summary>A mouth shape of the answer (SpeakConfig.LipSync), with its time on the answer's audio; comes before that audio.</summary>
        public event Action<VisemeTiming> Viseme;

        /// <summary>A word of the answer with its start and end on the answer's audio (SpeakConfig.LipSync).</summary>
        public event Action<WordTiming> Word;

        /// <summary>The answer ended (normally or interrupted).</summary>
        public event Action<AnswerEnd> End;

        /// <summary>The server refused or failed the request; no more events follow.</summary>
        public event Action<NpcVoiceException> Error;

        /// <summary>Completes with the end frame, or faults with an NpcVoiceException.</summary>
        public Task<AnswerEnd> Completion { get { return done.Task; } }

        public bool IsDone { get { return done.Task.IsCompleted; } }

        /// <summary>Send part of the question (encoded as the config says; at most 1 MiB per call).</summary>
        public Task SendAudioAsync(byte[] data, int offset, int count)
        {
            var chunk = new byte[count];
            Buffer.BlockCopy(data, offset, chunk, 0, count);
            return client.SendAsync(new Dictionary<string, object> { { "type", "audio" }, { "id", Id }, { "data", chunk } });
        }

        /// <summary>The player stopped talking: the answer starts now.</summary>
        public Task EndAudioAsync()
        {
            return client.SendAsync(new Dictionary<string, object> { { "type", "end_audio" }, { "id", Id } });
        }

        /// <summary>Interrupt the answer; the end frame still comes, with Interrupted = true.</summary>
        public Task CancelAsync()
        {
            if (IsDone) return Task.FromResult(0);
            return client.SendAsync(new Dictionary<string, object> { { "type", "cancel" }, { "id", Id } });
        }

        internal void Dispatch(string type, Dictionary<string, object> f)
        {
            switch (type)
            {
                case "text":
                    Raise(Text, NpcVoiceClient.Str(f, "text"));
                    break;
                case "audio":
                    var pcm = f.ContainsKey("pcm") ? f["pcm"] as byte[] : null;
                    if (pcm == null) throw new FormatException("audio frame without binary pcm");
                    var audio = Audio;
                    if (audio != null) audio(pcm, (int)NpcVoiceClient.Num(f, "sample_rate"), (int)NpcVoiceClient.Num(f, "seq"));
                    break;
                case "lip_sync":
                    foreach (var v in Maps(f, "visemes"))
                        Raise(Viseme, new VisemeTiming
                        {
                            Viseme = NpcVoiceClient.Str(v, "viseme"), StartMs = NpcVoiceClient.Num(v, "start_ms"),
                            DurationMs = NpcVoiceClient.Num(v, "duration_ms"),
                        });
                    foreach (var w in Maps(f, "words"))
                        Raise(Word, new WordTiming
                        {
                            Text = NpcVoiceClient.Str(w, "text"), StartMs = NpcVoiceClient.Num(w, "start_ms"),
                            EndMs = NpcVoiceClient.Num(w, "end_ms"),
                        });
                    break;
                case "end":
                    var end = new AnswerEnd
                    {
                        SessionId = NpcVoiceClient.Str(f, "session_id"),
                        Text = NpcVoiceClient.Str(f, "text"),
                        AudioSeconds = NpcVoiceClient.Num(f, "audio_seconds"),
                        Interrupted = f.ContainsKey("interrupted") && f["interrupted"] is bool && (bool)f["interrupted"],
                    };
                    var timings = f.ContainsKey("timings") ? f["timings"] as Dictionary<string, object> : null;
                    if (timings != null)
                        foreach (var kv in timings) end.Timings[kv.Key] = Convert.ToDouble(kv.Value, CultureInfo.InvariantCulture);
                    Raise(End, end);
                    done.TrySetResult(end);
                    break;
                case "error":
                    Fail(new NpcVoiceException(NpcVoiceClient.Str(f, "code"), NpcVoiceClient.Str(f, "message")));
                    break;
            }
        }

        internal void Fail(NpcVoiceException exc)
        {
            if (done.Task.IsCompleted) return;
            Raise(Error, exc);
            done.TrySetException(exc);
        }

        static void Raise<T>(Action<T> handler, T value)
        {
            if (handler != null) handler(value);
        }

        static IEnumerable<Dictionary<string, object>> Maps(Dictionary<string, object> f, string key)
        {
            var list = f.ContainsKey(key) ? f[key] as List<object> : null;
            if (list == null) throw new FormatException("lip_sync frame without a " + key + " array");
            foreach (var item in list)
            {
                var map = item as Dictionary<string, object>;
                if (map == null) throw new FormatException("lip_sync " + key + " entry is not a map");
                yield return map;
            }
        }
    }

    /// <summary>
    /// A connection to `npc-server serve`'s WebSocket bridge. Connect once, then ask NPCs questions with
    /// <see cref="StartSpeakAsync"/> / <see cref="SpeakAsync"/>; several answers may stream at once.
    /// </summary>
    public sealed class NpcVoiceClient : IDisposable
    {
        public const int ProtocolVersion = 1;
        public const int DefaultChunkBytes = 16 * 1024;

        readonly ClientWebSocket ws = new ClientWebSocket();
        readonly SemaphoreSlim sendLock = new SemaphoreSlim(1, 1);
        readonly ConcurrentDictionary<long, Speech> speeches = new ConcurrentDictionary<long, Speech>();
        readonly ConcurrentDictionary<long, TaskCompletionSource<Dictionary<string, object>>> requests =
            new ConcurrentDictionary<long, TaskCompletionSource<Dictionary<string, object>>>();
        readonly CancellationTokenSource life = new CancellationTokenSource();
        long nextId;
        Task receiveLoop;

        /// <summary>An error frame without a request id (a malformed frame), or a lost connection.</summary>
        public event Action<NpcVoiceException> Error;

        /// <summary>The connection closed (by either side); all pending answers have failed with UNAVAILABLE.</summary>
        public event Action Closed;

        public Welcome Welcome { get; private set; }

        public bool IsConnected { get { return ws.State == WebSocketState.Open; } }

        /// <summary>Open the WebSocket and say hello. Throws NpcVoiceException (e.g. UNAUTHENTICATED) if refused.</summary>
        public async Task<Welcome> ConnectAsync(Uri uri, string token, string clientId = null,
                                                CancellationToken cancel = default(CancellationToken))
        {
            await ws.ConnectAsync(uri, cancel).ConfigureAwait(false);
            var hello = new Dictionary<string, object> { { "type", "hello" }, { "version", ProtocolVersion } };
            if (token != null) hello["token"] = token;
            if (!string.IsNullOrEmpty(clientId)) hello["client_id"] = clientId;
            await SendAsync(hello).ConfigureAwait(false);
            var reply = await ReceiveFrameAsync(cancel).ConfigureAwait(false);
            if (reply == null) throw new NpcVoiceException("UNAVAILABLE", "the server closed the connection during the handshake");
            string type = Str(reply, "type");
            if (type == "error") throw new NpcVoiceException(Str(reply, "code"), Str(reply, "message"));
            if (type != "welcome") throw new NpcVoiceException("INTERNAL", "expected welcome, got " + type);
            Welcome = new Welcome
            {
                Version = (int)Num(reply, "version"), Server = Str(reply, "server"), Model = Str(reply, "model"),
                SampleRate = (int)Num(reply, "sample_rate"),
            };
            receiveLoop = Task.Run(() => ReceiveLoop());
            return Welcome;
        }

        /// <summary>
        /// Start a question: sends the speak frame. Then send audio and EndAudioAsync on the returned Speech.
        /// <paramref name="subscribe"/> is called before anything is sent, so no event is missed.
        /// </summary>
        public async Task<Speech> StartSpeakAsync(SpeakConfig config, Action<Speech> subscribe = null)
        {
            long id = Interlocked.Increment(ref nextId);
            var speech = new Speech(this, id);
            if (subscribe != null) subscribe(speech);
            speeches[id] = speech;
            try
            {
                await SendAsync(new Dictionary<string, object> { { "type", "speak" }, { "id", id }, { "config", config.ToMap() } })
                    .ConfigureAwait(false);
            }
            catch
            {
                Speech ignored;
                speeches.TryRemove(id, out ignored);
                throw;
            }
            return speech;
        }

        /// <summary>
        /// Ask a whole recorded question: speak, the audio in chunks, end_audio. Subscribe to the Speech's events in
        /// <paramref name="subscribe"/> (called before anything is sent, so no event is missed); await Completion for the end.
        /// </summary>
        public async Task<Speech> SpeakAsync(SpeakConfig config, byte[] audio, Action<Speech> subscribe = null,
                                             int chunkBytes = DefaultChunkBytes)
        {
            var speech = await StartSpeakAsync(config, subscribe).ConfigureAwait(false);
            if (audio != null)
            {
                if (chunkBytes % 2 == 1) chunkBytes++;  // keep s16 samples whole
                for (int i = 0; i < audio.Length && !speech.IsDone; i += chunkBytes)
                    await speech.SendAudioAsync(audio, i, Math.Min(chunkBytes, audio.Length - i)).ConfigureAwait(false);
            }
            if (!speech.IsDone) await speech.EndAudioAsync().ConfigureAwait(false);
            return speech;
        }

        /// <summary>Convert float samples in [-1, 1] to s16le bytes.</summary>
        public static byte[] FloatToPcm16(float[] samples, int offset, int count)
        {
            var bytes = new byte[count * 2];
            for (int i = 0; i < count; i++)
            {
                float f = samples[offset + i];
                if (f > 1f) f = 1f; else if (f < -1f) f = -1f;
                short s = (short)Math.Round(f * 32767f);
                bytes[2 * i] = (byte)s;
                bytes[2 * i + 1] = (byte)(s >> 8);
            }
            return bytes;
        }

        public Task<Dictionary<string, object>> HealthAsync() { return RequestAsync("health", null); }

        public Task<Dictionary<string, object>> ReloadPersonasAsync() { return RequestAsync("reload_personas", null); }

        public async Task<List<Dictionary<string, object>>> ListPersonasAsync()
        {
            var r = await RequestAsync("list_personas", null).ConfigureAwait(false);
            var list = new List<Dictionary<string, object>>();
            var raw = r.ContainsKey("personas") ? r["personas"] as List<object> : null;
            if (raw != null) foreach (var p in raw) list.Add((Dictionary<string, object>)p);
            return list;
        }

        /// <summary>Open a conversation with an NPC; pass its id in SpeakConfig.SessionId for follow-up questions.</summary>
        public async Task<string> OpenSessionAsync(string npcId, string sessionId = "")
        {
            var r = await RequestAsync("open_session", new Dictionary<string, object>
            {
                { "npc_id", npcId }, { "session_id", sessionId ?? "" },
            }).ConfigureAwait(false);
            return Str(r, "session_id");
        }

        public async Task<bool> CloseSessionAsync(string sessionId)
        {
            var r = await RequestAsync("close_session", new Dictionary<string, object> { { "session_id", sessionId } })
                .ConfigureAwait(false);
            return r.ContainsKey("closed") && r["closed"] is bool && (bool)r["closed"];
        }

        async Task<Dictionary<string, object>> RequestAsync(string type, Dictionary<string, object> fields)
        {
            long id = Interlocked.Increment(ref nextId);
            var tcs = new TaskCompletionSource<Dictionary<string, object>>();
            requests[id] = tcs;
            var frame = new Dictionary<string, object> { { "type", type }, { "id", id } };
            if (fields != null) foreach (var kv in fields) frame[kv.Key] = kv.Value;
            try
            {
                await SendAsync(frame).ConfigureAwait(false);
            }
            catch
            {
                TaskCompletionSource<Dictionary<string, object>> ignored;
                requests.TryRemove(id, out ignored);
                throw;
            }
            return await tcs.Task.ConfigureAwait(false);
        }

        internal async Task SendAsync(Dictionary<string, object> frame)
        {
            byte[] data = MiniMsgPack.Encode(frame);
            await sendLock.WaitAsync().ConfigureAwait(false);
            try
            {
                if (ws.State != WebSocketState.Open)
                    throw new NpcVoiceException("UNAVAILABLE", "the connection is closed");
                await ws.SendAsync(new ArraySegment<byte>(data), WebSocketMessageType.Binary, true, life.Token)
                    .ConfigureAwait(false);
            }
            finally
            {
                sendLock.Release();
            }
        }

        async Task<Dictionary<string, object>> ReceiveFrameAsync(CancellationToken cancel)
        {
            var chunk = new byte[64 * 1024];
            using (var ms = new MemoryStream())
            {
                while (true)
                {
                    WebSocketReceiveResult r = await ws.ReceiveAsync(new ArraySegment<byte>(chunk), cancel).ConfigureAwait(false);
                    if (r.MessageType == WebSocketMessageType.Close) return null;
                    ms.Write(chunk, 0, r.Count);
                    if (!r.EndOfMessage) continue;
                    if (r.MessageType != WebSocketMessageType.Binary)
                        throw new NpcVoiceException("INTERNAL", "the server sent a text frame");
                    var map = MiniMsgPack.Decode(ms.GetBuffer(), 0, (int)ms.Length) as Dictionary<string, object>;
                    if (map == null) throw new NpcVoiceException("INTERNAL", "the server sent a frame that is not a map");
                    return map;
                }
            }
        }

        async Task ReceiveLoop()
        {
            NpcVoiceException reason = null;
            try
            {
                while (!life.IsCancellationRequested)
                {
                    var f = await ReceiveFrameAsync(life.Token).ConfigureAwait(false);
                    if (f == null) break;
                    try
                    {
                        Route(f);
                    }
                    catch (Exception exc) when (!(exc is NpcVoiceException))
                    {
                        // a bug in an event handler (or an odd frame) must not stop the connection
                        if (Error != null) Error(new NpcVoiceException("INTERNAL", "while handling a frame: " + exc));
                    }
                }
            }
            catch (NpcVoiceException exc) { reason = exc; }
            catch (OperationCanceledException) { }
            catch (Exception exc) when (exc is WebSocketException || exc is IOException || exc is FormatException ||
                                        exc is ObjectDisposedException)
            {
                reason = new NpcVoiceException("UNAVAILABLE", "connection lost: " + exc.Message);
            }
            var closed = reason ?? new NpcVoiceException("UNAVAILABLE", "the connection closed");
            foreach (var kv in speeches) kv.Value.Fail(closed);
            speeches.Clear();
            foreach (var kv in requests) kv.Value.TrySetException(closed);
            requests.Clear();
            if (reason != null && Error != null) Error(reason);
            if (Closed != null) Closed();
        }

        void Route(Dictionary<string, object> f)
        {
            string type = Str(f, "type");
            object rawId = f.ContainsKey("id") ? f["id"] : null;
            if (!(rawId is long))
            {
                if (type == "error" && Error != null) Error(new NpcVoiceException(Str(f, "code"), Str(f, "message")));
                return;
            }
            long id = (long)rawId;
            Speech speech;
            if (speeches.TryGetValue(id, out speech))
            {
                if (type == "end" || type == "error") speeches.TryRemove(id, out speech);
                speech.Dispatch(type, f);
                return;
            }
            TaskCompletionSource<Dictionary<string, object>> tcs;
            if (requests.TryRemove(id, out tcs))
            {
                if (type == "error") tcs.TrySetException(new NpcVoiceException(Str(f, "code"), Str(f, "message")));
                else tcs.TrySetResult(f);
            }
        }

        /// <summary>Close the connection politely (pending answers fail with UNAVAILABLE).</summary>
        public async Task CloseAsync()
        {
            if (ws.State == WebSocketState.Open)
            {
                try
                {
                    // only send our close frame: the receive loop reads the server's reply (ClientWebSocket allows one
                    // receive at a time, so CloseAsync, which receives too, would race with it)
                    await ws.CloseOutputAsync(WebSocketCloseStatus.NormalClosure, "bye", CancellationToken.None).ConfigureAwait(false);
                }
                catch (WebSocketException) { }
                catch (OperationCanceledException) { }
            }
            if (receiveLoop != null) await Task.WhenAny(receiveLoop, Task.Delay(2000)).ConfigureAwait(false);
        }

        public void Dispose()
        {
            life.Cancel();
            ws.Dispose();
        }

        internal static string Str(Dictionary<string, object> f, string key)
        {
            object v;
            return f.TryGetValue(key, out v) && v != null ? Convert.ToString(v, CultureInfo.InvariantCulture) : "";
        }

        internal static double Num(Dictionary<string, object> f, string key)
        {
            object v;
            if (!f.TryGetValue(key, out v) || v == null || v is string || v is bool) return 0;
            return Convert.ToDouble(v, CultureInfo.InvariantCulture);
        }
    }
}
